"""``python -m tokenmill``: the same CLI as the ``tokenmill`` script."""

from .cli import main

if __name__ == "__main__":
    main()
