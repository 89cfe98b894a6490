#!/usr/bin/env sh
# A local CA and a teacher server certificate for the compose stack (or a trial cluster), made with openssl.
#
#   deploy/make-dev-certs.sh                       # -> deploy/tls/{ca.crt,ca.key,server.crt,server.key}
#   deploy/make-dev-certs.sh DIR [NAME ...]        # another directory; extra DNS names for the certificate
#
# The server certificate names teacher, localhost and 127.0.0.1 (plus any NAME given, e.g.
# teacher.maskedkd.svc.cluster.local for Kubernetes). The CA is made once and kept: running the script again issues
# a new server certificate (new names) that clients holding ca.crt still trust. deploy/tls/ is git-ignored.
# For production use your organisation's CA or cert-manager instead.
set -eu

dir=${1:-"$(dirname "$0")/tls"}
[ $# -gt 0 ] && shift
days=${MASKEDKD_CERT_DAYS:-825}
mkdir -p "$dir"

sans="DNS:teacher,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  sans="$sans,DNS:$name"
done

if [ ! -f "$dir/ca.crt" ] || [ ! -f "$dir/ca.key" ]; then
  (umask 077 && openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key")
  openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" -subj "/CN=maskedkd dev CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca.crt"
fi

openssl ecparam -name prime256v1 -genkey -noout -out "$dir/server.key.tmp"
openssl pkcs8 -topk8 -nocrypt -in "$dir/server.key.tmp" -out "$dir/server.key"
rm -f "$dir/server.key.tmp"
openssl req -new -key "$dir/server.key" -subj "/CN=teacher" -out "$dir/server.csr"
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
  "$sans" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -sha256 \
  -days "$days" -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
# The teacher container runs as uid 10001 and reads the key through a bind mount: readable by all here (a local
# trial's key). On a shared host instead: sudo chown 10001 "$dir/server.key" && chmod 600 "$dir/server.key".
chmod 644 "$dir/server.key" "$dir/server.crt" "$dir/ca.crt"
echo "made $dir/server.crt ($sans), signed by $dir/ca.crt"
