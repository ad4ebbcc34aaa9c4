"""``python -m control_server.ctl``: the same as `controlctl`."""

import sys

from control_server.ctl import main

sys.exit(main())
