"""``python -m neuroprobe`` (and ``torchrun -m neuroprobe record ...``) runs the ``neuroprobe`` command."""
from neuroprobe.cli import entry

if __name__ == "__main__":
    entry()
