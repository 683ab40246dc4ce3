"""Presets: pick a shipped/user/local preset, edit the common knobs, save as, start.

A listed file that cannot be read (not UTF-8, not TOML, unreadable, a dangling link) is selectable: the
editor is replaced by the reason, and ``current_preset`` refuses it, so it can never start.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import Footer, Label, OptionList, Static
from textual.widgets.option_list import Option

from ..catalog import PresetEntry, PresetSources, discover, printable, read_toml, same_file_key
from ..widgets.preset_form import PresetForm
from .modals import SaveAsScreen


class PresetsScreen(Screen):
    BINDINGS = [
        Binding("s", "app.start_run", "Start"),
        Binding("f5", "app.start_run", "Start", show=False),
        Binding("ctrl+s", "save_as", "Save as"),
        Binding("d", "app.show_dashboard", "Dashboard"),
        Binding("r", "app.show_runs", "Runs"),
        Binding("escape", "focus_list", "List", show=False),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, sources: PresetSources, selected: Path | None = None) -> None:
        super().__init__()
        self.sources = sources
        self.selected = selected
        self.entries: list[PresetEntry] = []
        self.entry: PresetEntry | None = None
        self.problem: str | None = None  # why the selected file cannot be used; None: the form holds it

    def compose(self) -> ComposeResult:
        with Horizontal(id="presets-body"):
            with Vertical(id="preset-side"):
                yield Label("Presets", classes="section-title")
                yield OptionList(id="preset-list")
            with Vertical(id="editor-side"):
                yield Label("", id="editor-title", classes="section-title")
                yield PresetForm(id="preset-form")
                yield Static("", id="preset-problem")
        yield Static("", id="preset-status")
        yield Footer()

    def on_mount(self) -> None:
        problem = self.query_one("#preset-problem", Static)
        problem.display = False
        problem.styles.padding = (1, 1)
        self.reload(self.selected)
        self.query_one(OptionList).focus()

    # -- list ------------------------------------------------------------------------------------
    def reload(self, select: Path | None = None) -> None:
        if select is not None and all(same_file_key(Path(select)) != same_file_key(Path(p)) for p in self.sources.extra):
            if same_file_key(Path(select)) not in {same_file_key(e.path) for e in discover(self.sources)}:
                self.sources.extra.append(Path(select))
        self.entries = discover(self.sources)
        options = []
        for entry in self.entries:
            prompt = Text.assemble((entry.label, "bold"), (f" {entry.kind}", "dim"))
            if entry.problem:
                prompt.append("\n  ✗ cannot be read", style="bold red")
            elif entry.description:
                prompt.append("\n  " + printable(entry.description), style="italic")
            options.append(Option(prompt))
        olist = self.query_one(OptionList)
        olist.clear_options()
        olist.add_options(options)
        index = 0
        if select is not None:
            for i, entry in enumerate(self.entries):
                if same_file_key(entry.path) == same_file_key(Path(select)):
                    index = i
        if self.entries:
            olist.highlighted = index
            self.load_entry(self.entries[index])
        else:
            self.entry, self.problem = None, None
            self.query_one(PresetForm).display, self.query_one("#preset-problem", Static).display = True, False
            self.query_one("#preset-status", Static).update("No presets found: save one with ctrl+s.")
            self.query_one(PresetForm).load({}, "<new preset>")

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        entry = self.entries[event.option_index]
        if entry is not self.entry:
            self.load_entry(entry)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if self.problem is None:
            self.query_one("#knob-run-rounds").focus()

    def load_entry(self, entry: PresetEntry) -> None:
        """Show ``entry`` in the editor; the file is read again, so a file fixed since the listing loads."""
        self.entry = entry
        found = read_toml(entry.path)
        if found.raw is None:
            self.show_problem(entry, found.problem or "cannot be read")
            return
        self.problem = None
        self.query_one("#editor-title", Label).update(Text(f"Edit {entry.label} ({entry.kind})"))
        form = self.query_one(PresetForm)
        form.display, self.query_one("#preset-problem", Static).display = True, False
        try:
            form.load(found.raw, str(entry.path))
        except Exception as error:  # noqa: BLE001 - an editor bug on odd content is shown, never fatal
            self.show_problem(entry, f"cannot be shown in the editor ({type(error).__name__}: {error})")

    def show_problem(self, entry: PresetEntry, problem: str) -> None:
        """Replace the editor by why ``entry`` cannot be used; ``current_preset`` refuses it from now on.

        ``problem`` reads after the file name: "is not valid TOML: ...", "cannot be read: Permission denied".
        """
        self.problem = problem
        self.query_one("#editor-title", Label).update(Text(f"{entry.label} ({entry.kind}): cannot be used"))
        self.query_one("#preset-problem", Static).update(Text.assemble(
            ("✗ ", "bold red"), (printable(str(entry.path)), "bold"), " " + printable(problem),
            "\n\nIt cannot be edited or started here. Fix the file, then select it again: it is read anew.",
        ))
        self.query_one(PresetForm).display, self.query_one("#preset-problem", Static).display = False, True
        status = self.query_one("#preset-status", Static)
        status.update(Text(f"✗ {entry.label} {printable(problem)}", style="bold"))
        status.set_class(True, "-error")

    # -- validation ----------------------------------------------------------------------------
    def on_preset_form_validated(self, event: PresetForm.Validated) -> None:
        if self.problem is not None:  # a late validation of the previous entry: the unreadable one stays shown
            return
        status = self.query_one("#preset-status", Static)
        if event.general:
            status.update(Text(f"✗ {event.general}", style="bold"))
        elif event.errors:
            n = len(event.errors)
            status.update(Text(f"✗ {n} invalid field{'s' if n > 1 else ''}: fix before starting", style="bold"))
        else:
            p = event.preset
            status.update(Text(f"✓ valid: {p.run.rounds} rounds × E={p.train.local_epochs}, "
                               f"{p.data.partition} partition, {p.federation.aggregation}, C={p.federation.fraction}"))
        status.set_class(bool(event.general or event.errors), "-error")

    def current_preset(self):
        """(preset, problem): the validated preset, or None and what is wrong.

        The problem is Textual markup (brackets escaped, names printable): it goes into notifications, and
        a file name or value such as ``x[/].toml`` must not be read as a tag.
        """
        if self.problem is not None:
            name = self.entry.label if self.entry is not None else "the preset"
            return None, escape(f"{name} {printable(self.problem)}")
        form = self.query_one(PresetForm)
        if form.preset is not None:
            return form.preset, None
        if form.errors:
            key, message = next(iter(form.errors.items()))
            return None, escape(printable(f"{key}: {message}"))
        return None, escape(printable(form.general or "no preset loaded"))

    # -- actions -------------------------------------------------------------------------------
    def action_focus_list(self) -> None:
        self.query_one(OptionList).focus()

    def action_save_as(self) -> None:
        preset, problem = self.current_preset()
        if preset is None:
            self.notify(f"Cannot save an invalid preset: {problem}", severity="error")
            return
        folder = self.sources.resolved_user_dir()
        suggestion = (self.entry.label + "-edited") if self.entry else "my-preset"

        def save(name: str | None) -> None:
            if not name:
                return
            self.save_preset(preset, folder / (name if name.endswith(".toml") else name + ".toml"))

        self.app.push_screen(SaveAsScreen(str(folder), suggestion), save)

    def save_preset(self, preset, path: Path) -> bool:
        from engine.presets import to_toml

        if path.exists():
            self.notify(f"{printable(path.name)} exists already; pick another name", severity="error", markup=False)
            return False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(to_toml(preset), encoding="utf-8")
        except OSError as error:
            self.notify(f"cannot save {printable(str(path))}: {error.strerror or error}", severity="error", markup=False)
            return False
        self.notify(f"saved {printable(str(path))}", markup=False)
        self.reload(path)
        return True
