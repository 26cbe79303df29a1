"""``python -m neuroprobe`` (and ``torchrun -m neuroprobe record ...``) runs the ``neuroprobe`` command."""
from neuroprobe.cli import main

if __name__ == "__main__":
    main()
