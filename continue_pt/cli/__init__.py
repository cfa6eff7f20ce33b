"""The ``continue-pt`` command line: thin commands over library functions, one error boundary.

Every command calls one library function. Errors the library reports to users (:class:`FileProblem` and its
subclasses) become one clean message and exit status 1 in one place, :meth:`_Cli.invoke`. The CLI is the
composition root: it imports ``converters`` lazily, so the training library never depends on it.

Here: the group, its error boundary and :func:`main`; the commands live in one module per verb group
(``convert_cmds``, ``pretrain_cmd``, ``export_cmd``, ``kmeans_cmds``, ``demo_cmd``,
``shards_cmds``) and are added to the group below.
"""

from __future__ import annotations

import errno
import warnings
from typing import Any

import click

from bundles.errors import FileProblem
from continue_pt.cli.convert_cmds import catalogue, convert, download, inspect, verify
from continue_pt.cli.demo_cmd import demo
from continue_pt.cli.export_cmd import export, plot
from continue_pt.cli.kmeans_cmds import kmeans, labels
from continue_pt.cli.pretrain_cmd import pretrain
from continue_pt.cli.shards_cmds import shards


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _options_warnings_as_lines(warnings.showwarning)
            try:
                return super().invoke(ctx)
            except FileProblem as exc:
                raise click.ClickException(str(exc)) from None
            except OSError as exc:  # the last net: a file the library did not expect to be unusable
                if exc.errno == errno.EPIPE:  # `continue-pt catalogue | head`: click ends quietly
                    raise
                where = f"{exc.filename}: " if exc.filename else ""
                raise click.ClickException(f"{where}{exc.strerror or exc}. Check the path and its permissions") \
                    from None


def _options_warnings_as_lines(show_others: Any) -> Any:
    """Our warnings about the options are messages to the user: one `Warning:` line each, once (the options are
    checked again where training starts); every other warning is shown as before."""
    from continue_pt.options import PretrainOptionsWarning

    shown: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, PretrainOptionsWarning):
            show_others(message, category, *args, **kwargs)
        elif str(message) not in shown:
            shown.add(str(message))
            click.echo(f"Warning: {message}", err=True)

    return show


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="continue-pt")
def cli() -> None:
    """Continue the pre-training of published HuBERT / wav2vec 2.0 checkpoints on your own audio.

    Start with `continue-pt convert` to turn a fairseq checkpoint into a bundle.
    """


# One module per verb group; each imports its heavy dependencies (torch, Lightning, the converters) only when its
# command runs, so that `continue-pt --help` and a bad option answer at once.
for _command in (convert, inspect, verify, download, catalogue, pretrain, export, plot, kmeans, labels, demo,
                 shards):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="continue-pt")

