"""Ray job entrypoint for the train stage: `ray job submit --working-dir . -- python jobs/train.py --config run.yaml`."""

import sys
from pathlib import Path

# The submitted working_dir's package comes first, so the job runs the code that was submitted.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermaflux.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main([Path(__file__).stem, *sys.argv[1:]], job=True))
