"""The per-client table, updated cell by cell for the clients that changed since the last tick."""

from __future__ import annotations

from textual.widgets import DataTable

from ..fmt import num, pct, size, sparkline
from ..state import ClientRow, RunState

COLUMNS = [("client", "Client"), ("domain", "Domain"), ("examples", "Ex"), ("loss", "Loss"),
           ("trend", "Loss trend"), ("val", "Val%"), ("test", "Test%"), ("sent", "Sent")]


def cells(row: ClientRow) -> dict[str, str]:
    return {
        "client": f"⚠ {row.client}" if row.faulty else row.client,  # the mode is in the log and the legend
        "domain": row.domain or "-",
        "examples": str(row.examples or "-"),
        "loss": num(row.last_loss),
        "trend": sparkline(row.losses, 12),
        "val": pct(row.val),
        "test": pct(row.test),
        "sent": size(row.bytes_up),
    }


class ClientTable(DataTable):
    DEFAULT_CSS = "ClientTable { height: auto; max-height: 10; }"

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = False
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def sync(self, state: RunState, full: bool = False) -> None:
        if full or "table" in state.dirty:
            # new clients: add rows we do not have yet (rows are never removed during a run)
            for name, row in state.clients.items():
                if name not in self.rows:
                    values = cells(row)
                    self.add_row(*(values[k] for k, _ in COLUMNS), key=name)
            names = list(state.clients)
        else:
            names = [n for n in state.dirty_clients if n in state.clients]
        for name in names:
            values = cells(state.clients[name])
            for key, _ in COLUMNS[1:]:
                self.update_cell(name, key, values[key], update_width=True)
