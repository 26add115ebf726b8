from ._entry import main

# Guarded: a helper process started with `spawn` (admin/offload.py) imports the parent's
# main module again, as __mp_main__, and must not run the command a second time.
if __name__ == "__main__":
    raise SystemExit(main())
