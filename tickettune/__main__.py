from tickettune.tools.cli import main

raise SystemExit(main())
