"""`python -m vdsmlite` runs the daemon."""

from vdsmlite.daemon import main

if __name__ == "__main__":
    main()
