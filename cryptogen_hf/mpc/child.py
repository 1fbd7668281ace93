"""Entry point of one :func:`cryptogen_hf.mpc.runtime.launch_local` child:
``python -m cryptogen_hf.mpc.child JOB RESULT``. A module of its own so that
``runtime`` is imported once, under its real name, in the child."""

import sys

from cryptogen_hf.mpc.runtime import child_main

if len(sys.argv) != 3:
    sys.exit("usage: python -m cryptogen_hf.mpc.child JOB_FILE RESULT_FILE")
child_main(sys.argv[1], sys.argv[2])
