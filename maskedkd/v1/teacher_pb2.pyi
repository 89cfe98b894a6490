from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shm")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shm: SharedMemory
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shm: _Optional[_Union[SharedMemory, _Mapping]] = ...) -> None: ...

class SharedMemory(_message.Message):
    __slots__ = ("name", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "image_height", "image_width", "patch_size", "grid_height", "grid_width", "num_prefix_tokens", "num_classes", "in_chans", "mean", "std", "full_gflops", "price_per_gflop", "currency", "models", "max_batch_images", "dtype", "outputs", "tome_r", "shared_memory")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IN_CHANS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    FULL_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_GFLOP_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_IMAGES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TOME_R_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    image_height: int
    image_width: int
    patch_size: int
    grid_height: int
    grid_width: int
    num_prefix_tokens: int
    num_classes: int
    in_chans: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    full_gflops: float
    price_per_gflop: float
    currency: str
    models: _containers.RepeatedScalarFieldContainer[str]
    max_batch_images: int
    dtype: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    tome_r: int
    shared_memory: bool
    def __init__(self, model: _Optional[str] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., patch_size: _Optional[int] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., num_prefix_tokens: _Optional[int] = ..., num_classes: _Optional[int] = ..., in_chans: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., full_gflops: _Optional[float] = ..., price_per_gflop: _Optional[float] = ..., currency: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., max_batch_images: _Optional[int] = ..., dtype: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ..., tome_r: _Optional[int] = ..., shared_memory: _Optional[bool] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "model", "images", "patches", "keep_indices", "keep_counts", "purpose", "accept_billed_answer", "outputs", "outputs_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    KEEP_INDICES_FIELD_NUMBER: _ClassVar[int]
    KEEP_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_BILLED_ANSWER_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    images: Tensor
    patches: Tensor
    keep_indices: Tensor
    keep_counts: Tensor
    purpose: str
    accept_billed_answer: bool
    outputs: _containers.RepeatedScalarFieldContainer[str]
    outputs_dtype: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., patches: _Optional[_Union[Tensor, _Mapping]] = ..., keep_indices: _Optional[_Union[Tensor, _Mapping]] = ..., keep_counts: _Optional[_Union[Tensor, _Mapping]] = ..., purpose: _Optional[str] = ..., accept_billed_answer: _Optional[bool] = ..., outputs: _Optional[_Iterable[str]] = ..., outputs_dtype: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("images", "tokens", "gflops", "full_gflops", "cost", "replayed", "output_bytes")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    FULL_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    images: int
    tokens: int
    gflops: float
    full_gflops: float
    cost: float
    replayed: bool
    output_bytes: int
    def __init__(self, images: _Optional[int] = ..., tokens: _Optional[int] = ..., gflops: _Optional[float] = ..., full_gflops: _Optional[float] = ..., cost: _Optional[float] = ..., replayed: _Optional[bool] = ..., output_bytes: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "logits", "usage", "error", "outputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    logits: Tensor
    usage: Usage
    error: Status
    outputs: Outputs
    def __init__(self, request_id: _Optional[str] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ..., outputs: _Optional[_Union[Outputs, _Mapping]] = ...) -> None: ...

class Outputs(_message.Message):
    __slots__ = ("pre_logits", "patch_tokens", "cls_attention")
    PRE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    PATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLS_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    pre_logits: Tensor
    patch_tokens: Tensor
    cls_attention: Tensor
    def __init__(self, pre_logits: _Optional[_Union[Tensor, _Mapping]] = ..., patch_tokens: _Optional[_Union[Tensor, _Mapping]] = ..., cls_attention: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
