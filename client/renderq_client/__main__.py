"""`python -m renderq_client` is the `renderq` command."""
from renderq_client.cli import main

raise SystemExit(main())
