import sys

from bench import snapshot

snapshot.take()  # before anything imports stream: the whole run measures this copy

from bench.run import main  # noqa: E402

sys.exit(main())
