"""``python -m memllm`` is the ``memllm`` command."""

import sys

from memllm.cli import main

sys.exit(main())
