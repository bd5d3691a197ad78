"""Diagrams of the declared state machines: `holdfast graph NAME`.

Drawn by the `transitions` library's own diagram support from each
`Machine`'s table; nothing here restates a table. Mermaid text needs no
system package; svg and png go through Graphviz (the `graphviz` Python
package and its `dot` binary).

The initial state is entered from a start marker and terminal states lead to
an end marker (mermaid's `[*]`; in Graphviz a point, and a double border on
terminal states). Both are also coloured. A diagram shows the declared
machine, never a model's run, so the library's "active" and "previous"
styling is not used.

The same machine gives the same bytes on every run, so the README can hold
the mermaid text and a test can compare it (tests/test_graph.py).
"""

from __future__ import annotations

import enum
import shutil

from transitions.extensions import diagrams_graphviz, diagrams_mermaid
from transitions.extensions.diagrams import GraphMachine

from holdfast.apps.fulfillment import WAYBILL
from holdfast.apps.inventory_machine import INVENTORY
from holdfast.machine import Machine

MACHINES: dict[str, Machine] = {machine.name: machine for machine in (INVENTORY, WAYBILL)}


class Format(enum.Enum):
    """Output formats; the value is the `--format` spelling."""

    MERMAID = "mermaid"
    SVG = "svg"
    PNG = "png"


class GraphvizMissing(Exception):
    """svg or png was asked for where Graphviz cannot draw it."""


# Names valid both as Graphviz X11 colours and as CSS colours (mermaid's classDef).
STYLES = {
    "default": GraphMachine.style_attributes["node"]["default"],
    "initial": {"fillcolor": "palegreen"},
    "terminal": {"fillcolor": "lightgrey", "peripheries": "2"},
}


class _Marked:
    """Styles the initial and terminal states in place of the library's
    styling of a model's run (its current state "active", set at start)."""

    def get_graph(self, title=None, roi_state=None):
        self.reset_styling()
        for name in self._final_states():
            self.set_node_style(name, "terminal")
        self.set_node_style(self.machine.initial, "initial")
        return super().get_graph(title=title, roi_state=roi_state)

    def _final_states(self) -> list[str]:
        return [name for name, state in self.machine.states.items() if state.final]


class _Mermaid(_Marked, diagrams_mermaid.Graph):
    # The library marks the initial state with `[*] --> STATE`; its flat graph
    # (unlike its nested one) leaves final states unmarked.
    def _add_edges(self, transitions, container):
        super()._add_edges(transitions, container)
        container.extend(f"{name} --> [*]" for name in self._final_states())


class _Graphviz(_Marked, diagrams_graphviz.Graph):
    # The library draws no start marker; a point with an edge to the initial
    # state is the usual one. The end marker is the double border (STYLES).
    def _add_edges(self, transitions, container):
        container.node("__start__", label="", shape="point", width="0.2", fillcolor="black")
        container.edge("__start__", self.machine.initial)
        super()._add_edges(transitions, container)


class _Diagram(GraphMachine):
    """A GraphMachine that draws with the marking graph classes above."""

    style_attributes = {**GraphMachine.style_attributes, "node": STYLES}

    def _init_graphviz_engine(self, graph_engine):
        return _Mermaid if graph_engine == "mermaid" else _Graphviz


def draw(machine: Machine, format: Format | str = Format.MERMAID) -> str | bytes:
    """The diagram of `machine`: mermaid or svg text (ending in a newline), or png bytes.

    Raises GraphvizMissing (one line, naming the fix) for svg or png when the
    `graphviz` package or the `dot` binary is not installed.
    """
    format = Format(format)
    if format is Format.MERMAID:
        # transitions writes the title as a bare YAML scalar, which mermaid
        # ignores; `title: NAME` is the front matter mermaid shows. Its blank
        # lines carry the indent: trimmed, so an editor that strips trailing
        # spaces leaves the README's copy equal to this.
        text = _diagram(machine, "mermaid").get_graph(title=f"title: {machine.name}").draw(None)
        return "".join(line.rstrip() + "\n" for line in text.splitlines())
    _require_graphviz(format)
    drawn = _diagram(machine, "graphviz").get_graph(title=machine.name).draw(None, format=format.value)
    return drawn.decode() if format is Format.SVG else drawn


def _diagram(machine: Machine, engine: str) -> _Diagram:
    # Built from the declared table, as Machine._build is; `final` marks the
    # terminal states, which the library's markup carries to the graph.
    return _Diagram(
        states=[{"name": s.name, "final": s in machine.terminal} for s in machine.states],
        transitions=[{"trigger": e, "source": s.name, "dest": d.name} for s, e, d in machine.table],
        initial=machine.initial.name,
        auto_transitions=False,
        graph_engine=engine,
    )


def _require_graphviz(format: Format) -> None:
    try:
        import graphviz  # noqa: F401  (transitions' graphviz engine draws with it)
    except ImportError:
        raise GraphvizMissing(
            f"{format.value} needs the graphviz Python package: pip install 'holdfast[graph]'"
        ) from None
    if shutil.which("dot") is None:
        raise GraphvizMissing(
            f"{format.value} needs Graphviz's dot binary on PATH: apt-get install graphviz"
        )
