"""``python -m servable_framework.keys create DIR`` / ``add-client DIR NAME``: CurveZMQ keys for the ZMQ front end
and the Distributed Worker <-> Agent links (see `servable_framework.curve`)."""

from servable_framework.curve import main

if __name__ == "__main__":
    main()
