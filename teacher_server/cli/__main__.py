"""`python -m teacher_server.cli ...`: the same as `teacher-server ...`."""

import sys

from teacher_server.cli.main import main

sys.exit(main())
