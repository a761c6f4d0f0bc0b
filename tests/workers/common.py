"""What every worker script launched by the tests starts with: its arguments (the output path,
then config overrides; the launcher's --local_rank dropped), the demo config with them, the process
group and a Trainer."""
import os
import sys


def trainer_from_argv():
    """(output path, config, rank, world size, Trainer)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    out_json, overrides = args[0], args[1:]
    from distssl.config import load_config
    from distssl.distributed.peers import init_distributed
    from distssl.models.factory import fill_input_defaults
    from distssl.train.trainer import Trainer

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml"), overrides)
    fill_input_defaults(cfg)
    rank, world, local_rank = init_distributed(5)
    return out_json, cfg, rank, world, Trainer(cfg, rank, world, local_rank)
