"""`nla <stage> --config FILE [--key value ...]` — one entry point, one subcommand per stage.

Each stage lives in its own module exposing `main(argv) -> int`; the module docstring shows the
single-process and multi-GPU commands. A stage whose module is not there yet says so and exits 2.
"""

from __future__ import annotations

import importlib
import sys

STAGES: dict[str, tuple[str, str]] = {
    "datagen": ("nla.stages.datagen", "extract activations + teacher explanations into parquet datasets"),
    "train-ar": ("nla.stages.train_ar", "supervised warm start of the AR (explanation -> activation)"),
    "train-av": ("nla.stages.train_av", "supervised warm start of the AV (activation -> explanation)"),
    "rl": ("nla.stages.rl", "joint RL: GRPO on the AV with the live AR as reward, AR co-trained"),
    "verbalize": ("nla.stages.verbalize", "explanations for text or vectors from a checkpoint"),
    "eval": ("nla.stages.evaluate", "faithfulness report with controls"),
    "plan": ("nla.stages.plan", "memory per process of an RL run, from the model's config alone"),
    "demo": ("nla.stages.demo", "the whole pipeline on the embedded model, small budget"),
}

USAGE = """usage: nla <stage> [--config FILE] [--output_dir DIR] [--key value ...]

Natural Language Autoencoders: an AV verbalizes an activation, an AR reconstructs it from the text.

stages:
{stages}

`nla <stage> --help` lists every option of a stage. Configs: configs/embedded.yaml, configs/smoke.yaml.
Expected failures (bad options, missing or corrupt files, full disk) print one line and exit 2;
add --debug to see the traceback.
"""


def usage() -> str:
    width = max(map(len, STAGES))
    return USAGE.format(stages="\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from nla import __version__

        print(__version__)
        return 0
    debug = "--debug" in argv[1:]  # show the traceback of an expected error too
    stage, rest = argv[0], [a for a in argv[1:] if a != "--debug"]
    if stage not in STAGES:
        print(f"nla: unknown stage {stage!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    from nla.core.config import ConfigError
    from nla.core.sidecar import SidecarError
    from nla.data.corpus import CorpusError
    from nla.models.engines import EngineError
    from nla.models.sources import ModelError

    try:
        return int(module.main(rest) or 0)
    except (ConfigError, CorpusError, EngineError, ModelError, SidecarError) as err:
        if debug:
            raise
        print(f"nla {stage}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no: name the file and what to do
        from nla.core.io import describe_os_error

        if debug:
            raise
        print(f"nla {stage}: error: {describe_os_error(err)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
