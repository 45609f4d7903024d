"""What the benchmark and load scripts share, so each script holds only its experiment.

- `report`: the machine description, one percentile helper, the `--out`/`--smoke` options
  every script takes, and the writer of `<out>/<name>.json`, `.md` (and `.png`).
- `corpus`: sentences from this machine's license texts and manual pages, and `Texts`, which
  hands out texts that never repeat (so no cache answers) unless asked to.
- `loadgen`: the localhost guard and one closed-loop HTTP load generator.
- `routeload`: the service's routes under stepped load with it (request bodies per route, the
  seed corpus, /v1/status sampling, the step summary): what loadtest.py runs.
- `cluster`: the app on a Ray cluster of its own, in process or as `serve run`, torn down
  after.
- `child`: child processes: a JSON-spec worker run to completion, or a server kept until
  stopped.
- `measure`: process measurements (memory, CPU time, and the machine's CPU by process kind:
  proxy, ingress, each model, Ray, a peer server) and device choice.
- `models`: the models as their replicas load them, through the Ray-free engine APIs in
  deployments/engines, for the raw in-process phases; `minilm`: the peers' plain
  sentence-transformers model.

Scripts are run as files (`python scripts/bench_x.py`), which puts `scripts/` first on the
import path: they import this package as `benchkit`, and never import each other. `smoke.py` runs
every benchmark and load script with `--smoke` (`make bench-smoke`).
"""
