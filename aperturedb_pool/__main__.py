from aperturedb_pool.cli import main

raise SystemExit(main())
