"""`studio eval ...`: quality numbers as JSON. Each task's module adds its own subcommand to
`eval_app` (caption, clip, music, code, image, ...)."""

from studio.cli.common import new_app

eval_app = new_app("Measure quality: caption BLEU/CIDEr, CLIP zero-shot, music statistics, code pass@k, ...")


def register(root) -> None:
    root.add_typer(eval_app, name="eval")
