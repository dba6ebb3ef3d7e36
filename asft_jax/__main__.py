import sys

from asft_jax.cli.commands import main

sys.exit(main())
