"""`fedtui pretrain PRESET`: pre-train the small CLIP with a Rich progress bar and a line per epoch.

Exit codes follow `fedtui run`: 0 ok, 1 failed, 2 bad preset (nothing written), 130 stopped by Ctrl-C
(after saving a resume state: run again with --resume to continue).
"""

from __future__ import annotations

import signal
import threading
import traceback

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedtui.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK


def _format_accuracy(zero_shot: dict[str, float]) -> str:
    return "  ".join(f"{domain} {100 * acc:5.1f}" for domain, acc in zero_shot.items())


class _Reporter:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.corpus_task = None
        self.train_task = None
        self.status = "stopped"

    def __call__(self, event) -> None:
        from engine import pretrain as p

        if isinstance(event, p.PretrainStarted):
            resumed = f", resuming at epoch {event.start_epoch} step {event.start_step + 1}" if event.start_step or event.start_epoch > 1 else ""
            self.console.print(
                f"[bold]pretrain[/] {event.arch} ({event.parameters / 1e6:.2f} M parameters) on {event.corpus_images} images "
                f"of {', '.join(event.domains)}; {event.epochs} epochs x {event.steps_per_epoch} steps -> {event.out_dir}{resumed}"
            )
            done = (event.start_epoch - 1) * event.steps_per_epoch + event.start_step
            self.train_task = self.progress.add_task(
                "training", total=event.epochs * event.steps_per_epoch, completed=done, status="", visible=False
            )
        elif isinstance(event, p.CorpusProgress):
            if self.corpus_task is None:
                self.corpus_task = self.progress.add_task("rendering corpus", total=event.total, status="")
            self.progress.update(self.corpus_task, completed=event.rendered)
        elif isinstance(event, p.PretrainStep):
            status = f"epoch {event.epoch}/{(event.total_steps // event.steps)} loss {event.loss:.3f} lr {event.lr:.1e}"
            self.progress.update(self.train_task, completed=event.global_step, status=status, visible=True)
        elif isinstance(event, p.EpochFinished):
            unseen = f" | unseen {100 * event.mean_unseen:.1f}" if event.mean_unseen is not None else ""
            self.progress.console.print(
                f"epoch {event.epoch}/{event.epochs}  loss {event.mean_loss:.3f}  zero-shot {_format_accuracy(event.zero_shot)}"
                f"  | seen {100 * event.mean_seen:.1f}{unseen}  ({event.seconds:.0f} s)"
            )
        elif isinstance(event, p.PretrainFinished):
            self.status = event.status
            verb = "finished" if event.status == "completed" else "stopped; continue with --resume"
            self.progress.console.print(f"[bold]{verb}[/] in {event.seconds:.0f} s -> {event.out_dir}")


def _print_problems(err: Console, error) -> None:
    """One line per problem (file, [key], message), never wrapped and never read as Rich markup."""
    for problem in error.problems:
        err.print(f"[bold red]error:[/] {escape(str(problem))}", soft_wrap=True)


def pretrain_command(preset_path: str, out: str | None, resume: bool) -> int:
    from engine.pretrain import ResumeStateError, load_preset, pretrain
    from engine.schema import PresetError

    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        config = load_preset(preset_path)
    except PresetError as error:  # every problem in the file, before anything is written
        _print_problems(err, error)
        return EXIT_BAD_INPUT

    stop = threading.Event()

    def graceful_stop(signum, frame):
        err.print("\n[yellow]stopping after the current batch (Ctrl-C again to abort)...[/]")
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    reporter = _Reporter(console)
    previous = signal.signal(signal.SIGINT, graceful_stop)
    try:
        with reporter.progress:
            pretrain(config, reporter, stop, out_dir=out, resume=resume)
    except PresetError as error:  # a resume state made by another preset
        _print_problems(err, error)
        return EXIT_BAD_INPUT
    except ResumeStateError as error:  # an old pickled or damaged resume state: refused before training
        err.print(f"[bold red]error:[/] {escape(str(error))}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        err.print("[red]aborted[/]")
        return EXIT_INTERRUPTED
    except Exception:
        err.print(f"[bold red]pretraining failed:[/]\n{traceback.format_exc()}")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
    return EXIT_OK if reporter.status == "completed" else EXIT_INTERRUPTED
