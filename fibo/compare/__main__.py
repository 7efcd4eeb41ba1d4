"""``python -m fibo.compare``: the same as ``fibo-compare``."""

from fibo.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
