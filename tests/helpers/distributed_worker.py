"""Run under torchrun by tests/test_scale.py: train each case of a JSON plan on this world, save the weights.

    torchrun --nproc-per-node 2 tests/helpers/distributed_worker.py PLAN.json OUT_DIR

PLAN.json: a list of {"name", "config": RunConfig fields, "stop_after": optional step, "execute":
optional}. A case with "stop_after" raises after that step (its checkpoints, taken with
save_every, stay in OUT_DIR/<name>/.tmp-run); an "execute" case is a whole run as `neobench run`
makes it (run directory under config runs_dir, named <name>, evaluation on rank 0); the others
save their final changed weights to OUT_DIR/<name>.safetensors.
One launch trains every case: the process start-up (seconds of imports) is paid once.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from neobench.runs.config import RunConfig, apply_overrides
from neobench.training.distributed import close
from neobench.training.loop import train
from neobench.training.workspace import prepare


class StopHere(Exception):
    pass


def main() -> None:
    plan, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    world = None
    for case in plan:
        cfg = apply_overrides(RunConfig(), case["config"], case["name"])
        if case.get("execute"):
            from neobench.runs.execute import execute

            execute(cfg, run_id=case["name"])
            continue
        ws = prepare(cfg)
        world = ws.world
        run_tmp = out / case["name"] / ".tmp-run"
        if world.main:
            run_tmp.mkdir(parents=True, exist_ok=True)

        def stop(step, student, limit=case.get("stop_after")):
            if limit is not None and step > limit:
                raise StopHere

        try:
            trained = train(cfg, ws, after_step=stop, run_tmp=run_tmp)
        except StopHere:
            continue
        if world.main:
            save_file(trained.weights, str(out / f"{case['name']}.safetensors"))
    close(world)


if __name__ == "__main__":
    main()
