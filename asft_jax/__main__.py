import sys

from asft_jax.cli import main

sys.exit(main())
