from mpokit.cli.main import main

raise SystemExit(main())
