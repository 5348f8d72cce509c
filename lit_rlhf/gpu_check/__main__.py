"""``python -m lit_rlhf.gpu_check``."""

import sys

from lit_rlhf.gpu_check import main

sys.exit(main())
