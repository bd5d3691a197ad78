"""`holdfast lint` (contracts.lint): one fixture folder per rule, each run once.

Every rule has tests/lint_fixtures/<RULE_ID>/pass (lints clean) and /fail
(reports exactly the lines in EXPECTED). Breaking-change rules keep a
`before/` and an `after/` tree in each: the test commits both, one after the
other, into a real git repository and lints `--against HEAD~1`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from holdfast.contracts import breaking, lint, rules
from tests.process import ROOT

FIXTURES = ROOT / "tests" / "lint_fixtures"
SLA = FIXTURES / "sla.toml"
CONFIG = FIXTURES / "config.toml"
ALL_RULES = (*rules.RULES, *breaking.RULES)
BREAKING = {rule.id for rule in breaking.RULES}
PROTO = "acme/v1/orders.proto"

# What each fail fixture reports, paths relative to the fixture folder (for
# breaking rules, to the git repository whose protos/ holds the tree).
EXPECTED: dict[str, list[str]] = {
    "RPC_CONTRACT_REQUIRED": [
        (f"{PROTO}:19:7: RPC_CONTRACT_REQUIRED RPC acme.v1.OrderService/GetOrder declares no "
        "(holdfast.contract.v1.contract) option; every RPC needs a contract with its timeout, idempotency key and retry policy."),
    ],
    "CONTRACT_TIMEOUT_REQUIRED": [
        (f"{PROTO}:11:7: CONTRACT_TIMEOUT_REQUIRED Contract of acme.v1.OrderService/PlaceOrder has timeout_ms 0; "
        "it must be a positive number of milliseconds."),
    ],
    "CONTRACT_KEY_REQUIRED": [
        (f"{PROTO}:10:5: CONTRACT_KEY_REQUIRED RPC acme.v1.OrderService/PlaceOrder changes state (its idempotency_level "
        "is not NO_SIDE_EFFECTS) but its contract declares no idempotency_key, so a retry would repeat the change "
        "instead of replaying it."),
    ],
    "CONTRACT_KEY_FIELDS_EXIST": [
        (f'{PROTO}:12:37: CONTRACT_KEY_FIELDS_EXIST Idempotency key field "sku" of acme.v1.OrderService/PlaceOrder is '
        'not a field of acme.v1.PlaceOrderRequest (its fields: "order_id", "sku_id", "quantity").'),
    ],
    "CONTRACT_KEY_FIELDS_SCALAR": [
        (f'{PROTO}:12:37: CONTRACT_KEY_FIELDS_SCALAR Idempotency key field "tags" of acme.v1.OrderService/PlaceOrder is '
        "a repeated string; a key field must be a singular scalar so the key has one stable encoding."),
    ],
    "CONTRACT_LOCK_TTL_BELOW_TIMEOUT": [
        (f"{PROTO}:14:7: CONTRACT_LOCK_TTL_BELOW_TIMEOUT Contract of acme.v1.OrderService/PlaceOrder has lock_ttl_ms "
        "2000, not below its timeout_ms 2000; the lock lease must end before the call's budget does."),
    ],
    "CONTRACT_ON_DUPLICATE_KNOWN": [
        (f"{PROTO}:16:7: CONTRACT_ON_DUPLICATE_KNOWN Contract of acme.v1.OrderService/PlaceOrder has on_duplicate 7, "
        "which is not one holdfast knows (ON_DUPLICATE_REFUSE (0), ON_DUPLICATE_WAIT (1)); the server would refuse "
        "to serve it."),
    ],
    "CONTRACT_ON_DUPLICATE_WAIT_KEYED": [
        (f"{PROTO}:25:7: CONTRACT_ON_DUPLICATE_WAIT_KEYED Contract of acme.v1.OrderService/GetOrder waits for "
        "duplicates (on_duplicate: ON_DUPLICATE_WAIT) but declares no idempotency_key; without a key no two calls "
        "are duplicates, so there is nothing to wait for."),
    ],
    "CONTRACT_SLA_DEFINED": [
        (f'{PROTO}:15:7: CONTRACT_SLA_DEFINED Contract of acme.v1.OrderService/PlaceOrder names sla "orders-writes", '
        'which is not an entry of tests/lint_fixtures/sla.toml (entries: "orders-read", "orders-write").'),
    ],
    "CONTRACT_TIMEOUT_WITHIN_SLA": [
        (f"{PROTO}:11:7: CONTRACT_TIMEOUT_WITHIN_SLA Contract of acme.v1.OrderService/PlaceOrder has timeout_ms 4000, "
        'above timeout_ms_max 3000 of sla "orders-write".'),
    ],
    "CONTRACT_RETRY_WITHIN_BUDGET": [
        (f"{PROTO}:13:7: CONTRACT_RETRY_WITHIN_BUDGET Contract of acme.v1.OrderService/PlaceOrder can take "
        "4 * (2000 + 200) = 8800 ms over all attempts (max_attempts * (timeout_ms + fixed_delay_ms)), above "
        'budget_ms 8000 of sla "orders-write".'),
    ],
    "FAULT_METHOD_KNOWN": [
        ('faults.toml:2:1: FAULT_METHOD_KNOWN Fault table ["acme.v1.OrderService/PlaceOrders"] names no RPC of the '
        "linted protos, so it would inject nothing (a table is keyed by the full method name, pkg.Service/Method)."),
    ],
    "FAULT_DELAY_BELOW_TIMEOUT": [
        ("faults.toml:3:1: FAULT_DELAY_BELOW_TIMEOUT Fault delay_ms 2000 for acme.v1.OrderService/PlaceOrder is not "
        "below the method's timeout_ms 2000, so every delayed call would run out of budget instead of running slow."),
    ],
    "GENERATED_CODE_FRESH": [
        ("generated/STAMP.json:1:1: GENERATED_CODE_FRESH Generated code in "
        "tests/lint_fixtures/GENERATED_CODE_FRESH/fail/generated is stale "
        "(tests/lint_fixtures/GENERATED_CODE_FRESH/fail/acme/v1/orders.proto: changed since the last "
        "`holdfast codegen`); run `holdfast codegen --protos tests/lint_fixtures/GENERATED_CODE_FRESH/fail "
        "--out tests/lint_fixtures/GENERATED_CODE_FRESH/fail/generated`."),
    ],
    "RPC_NO_DELETE": [
        (f"protos/{PROTO}:8:9: RPC_NO_DELETE RPC acme.v1.OrderService/GetOrder exists at HEAD~1 but not here: it was "
        "removed or renamed, which breaks its clients and the replay of its recorded calls."),
    ],
    "CONTRACT_KEY_SAME_FIELDS": [
        (f'protos/{PROTO}:12:7: CONTRACT_KEY_SAME_FIELDS Idempotency key of acme.v1.OrderService/PlaceOrder changed '
        'from ["order_id"] at HEAD~1 to ["order_id", "sku_id"]; every recorded key of this RPC would no longer replay.'),
    ],
    "CONTRACT_TIMEOUT_NO_RAISE_PAST_SLA": [
        (f"protos/{PROTO}:11:7: CONTRACT_TIMEOUT_NO_RAISE_PAST_SLA Contract of acme.v1.OrderService/PlaceOrder raised "
        'timeout_ms from 2000 at HEAD~1 to 3500, beyond timeout_ms_max 3000 of sla "orders-write" at HEAD~1; '
        "clients size their deadlines by that SLA."),
    ],
    "ENUM_VALUE_NO_DELETE": [
        (f"protos/{PROTO}:39:6: ENUM_VALUE_NO_DELETE Enum value ORDER_STATE_SHIPPED = 2 of acme.v1.OrderState exists "
        "at HEAD~1 but not here; stored states and recorded replies that carry it would no longer decode."),
    ],
}


def run(*args: str | Path, cwd: Path = ROOT) -> tuple[int, str, str]:
    """`holdfast lint ARGS` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = lint.main([str(arg) for arg in args])
    return status, out.getvalue(), err.getvalue()


def fixture_args(folder: Path) -> list[str | Path]:
    """The fixture folder is the proto root; a faults.toml or a generated/ in it is passed too."""
    args: list[str | Path] = [folder.relative_to(ROOT), "--sla", SLA.relative_to(ROOT), "--config", CONFIG.relative_to(ROOT)]
    if (folder / "faults.toml").exists():
        args += ["--faults", (folder / "faults.toml").relative_to(ROOT)]
    if (folder / "generated").is_dir():
        args += ["--generated", (folder / "generated").relative_to(ROOT)]
    return args


@functools.cache
def lint_fixture(rule: str, kind: str) -> tuple[int, str, str]:
    """Each lint fixture is compiled and linted once per test session."""
    return run(*fixture_args(FIXTURES / rule / kind))


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=holdfast tests", "-c", "user.email=tests@holdfast.invalid", "-c", "commit.gpgsign=false", *args],
        cwd=repo, capture_output=True, text=True, check=True,
    )
    return done.stdout


def two_revisions(repo: Path, before: Path, after: Path, into: str = "protos") -> None:
    """A git repository whose HEAD~1 has `before` at `into/` and whose HEAD (and working tree) has `after`."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    for tree, message in ((before, "before"), (after, "after")):
        shutil.rmtree(repo / into, ignore_errors=True)
        shutil.copytree(tree, repo / into)
        git(repo, "add", "--all", into)
        git(repo, "commit", "-q", "--allow-empty", "-m", message)


@functools.cache
def lint_breaking(rule: str, kind: str, scratch: Path) -> tuple[int, str, str]:
    folder = FIXTURES / rule / kind
    repo = scratch / rule / kind
    two_revisions(repo, folder / "before", folder / "after")
    sla = "protos/sla.toml" if (folder / "after" / "sla.toml").exists() else SLA
    return run("protos", "--against", "HEAD~1", "--sla", sla, "--config", CONFIG, cwd=repo)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lint")


def outcome(rule: str, kind: str, scratch: Path) -> tuple[int, str, str]:
    return lint_breaking(rule, kind, scratch) if rule in BREAKING else lint_fixture(rule, kind)


# -- the rules are data, each with its fixtures ---------------------------------------------


def test_rules_are_data_with_stable_ids_purposes_and_fixture_folders():
    ids = [rule.id for rule in ALL_RULES]
    assert len(ids) == len(set(ids))
    for rule in ALL_RULES:
        subject, _, prop = rule.id.partition("_")
        assert rule.id.isupper() and subject and prop, rule.id
        assert rule.purpose.endswith(".") and rule.purpose.count(". ") == 0, rule.purpose  # one sentence
        assert rule.category in {"CONTRACT", "SLA", "FAULT", "GENERATED", "BREAKING"}
        assert (FIXTURES / rule.id / "pass").is_dir() and (FIXTURES / rule.id / "fail").is_dir(), rule.id
    folders = {path.name for path in FIXTURES.iterdir() if path.is_dir()}
    assert folders == set(ids) == set(EXPECTED)


@pytest.mark.parametrize("rule", [rule.id for rule in ALL_RULES])
def test_the_pass_fixture_lints_clean(rule, scratch):
    assert outcome(rule, "pass", scratch) == (0, "", "")


@pytest.mark.parametrize("rule", [rule.id for rule in ALL_RULES])
def test_the_fail_fixture_reports_exactly_its_lines(rule, scratch):
    status, out, err = outcome(rule, "fail", scratch)
    prefix = "" if rule in BREAKING else f"tests/lint_fixtures/{rule}/fail/"
    assert (status, err) == (1, "")
    assert out.splitlines() == [prefix + line for line in EXPECTED[rule]]


def test_a_stamp_that_is_not_json_is_stale_not_a_crash(tmp_path):
    shutil.copytree(FIXTURES / "GENERATED_CODE_FRESH" / "pass", tmp_path / "tree")
    (tmp_path / "tree" / "generated" / "STAMP.json").write_text("{ not json")
    status, out, err = run("tree", "--sla", SLA, "--config", CONFIG, "--generated", "tree/generated", cwd=tmp_path)
    assert (status, err) == (1, "")
    assert out.startswith("tree/generated/STAMP.json:1:1: GENERATED_CODE_FRESH Generated code in tree/generated is stale "
                          "(tree/generated/STAMP.json cannot be read: ")


def test_the_project_protos_lint_clean():
    assert run("protos") == (0, "", "")


# A team's own tree, outside holdfast's protos/: the tables example, linted as
# docs/build-a-service.md shows (holdfast's protos/ is on the include path).
EXAMPLE = Path("examples/tables")
EXAMPLE_ARGS = (EXAMPLE / "protos", "--sla", EXAMPLE / "sla.toml", "--generated", EXAMPLE)


def test_a_teams_protos_lint_clean_with_their_sla_registry_and_generated_code():
    assert run(*EXAMPLE_ARGS) == (0, "", "")


def test_a_teams_slas_are_unknown_to_holdfasts_own_registry():
    status, out, err = run(EXAMPLE / "protos")
    assert (status, err) == (1, "")
    proto = EXAMPLE / "protos/restaurant/tables/v1/tables.proto"
    assert [line.split(": CONTRACT_SLA_DEFINED ")[0] for line in out.splitlines()] == [
        f"{proto}:22:7", f"{proto}:35:7", f"{proto}:47:7", f"{proto}:57:7",
    ]


def test_a_teams_touched_proto_makes_its_generated_code_stale(tmp_path):
    shutil.copytree(ROOT / EXAMPLE, tmp_path / EXAMPLE, ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / EXAMPLE / "protos/restaurant/tables/v1/tables.proto").open("a") as proto:
        proto.write("// touched\n")
    status, out, err = run(*EXAMPLE_ARGS, cwd=tmp_path)
    assert (status, err) == (1, "")
    assert out == (
        "examples/tables/STAMP.json:1:1: GENERATED_CODE_FRESH Generated code in examples/tables "
        "is stale (examples/tables/protos/restaurant/tables/v1/tables.proto: changed since the last `holdfast codegen`);"
        " run `holdfast codegen --protos examples/tables/protos --out examples/tables`.\n"
    )


def test_a_fresh_interpreter_reads_the_option_as_an_unknown_field_and_agrees(scratch):
    """In a pytest process the generated contract_pb2 is imported, so the
    option parses as a known extension; a bare `python -m contracts.lint`
    sees it as an unknown field. Both must give the same findings."""
    assert "holdfast.contract.v1.contract_pb2" in sys.modules
    rule = "CONTRACT_KEY_FIELDS_SCALAR"
    done = subprocess.run([sys.executable, "-m", "holdfast.contracts.lint", *map(str, fixture_args(FIXTURES / rule / "fail"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == lint_fixture(rule, "fail")


def test_a_single_file_path_finds_its_root_from_its_package():
    folder = FIXTURES / "CONTRACT_SLA_DEFINED" / "fail"
    status, out, _ = run(folder.relative_to(ROOT) / PROTO, "--sla", SLA, "--config", CONFIG)
    assert (status, out) == lint_fixture("CONTRACT_SLA_DEFINED", "fail")[:2]


def test_columns_count_characters_where_protoc_expands_tabs(tmp_path):
    (tmp_path / "acme" / "v1").mkdir(parents=True)
    text = (FIXTURES / "CONTRACT_TIMEOUT_REQUIRED" / "fail" / PROTO).read_text()
    (tmp_path / PROTO).write_text(text.replace("      timeout_ms: 0", "\t\ttimeout_ms: 0"))
    status, out, _ = run(".", "--sla", SLA, "--config", CONFIG, cwd=tmp_path)
    assert status == 1 and out.startswith(f"{PROTO}:11:3: CONTRACT_TIMEOUT_REQUIRED ")


# -- breaking changes on a real second revision -------------------------------------------


def between(text: str, start: str, end: str) -> str:
    """The part of `text` from the line starting `start` to the first `end` after it."""
    first = text.index(start)
    return text[first : text.index(end, first) + len(end)]


def test_breaking_changes_to_the_inventory_service_against_a_real_revision(tmp_path):
    """The project's protos and SLA registry, committed; then one commit that
    removes Release, drops timestamp_ms from Reserve's key, raises Confirm's
    timeout together with its SLA entry, and removes a ReservationState."""
    repo = tmp_path / "repo"
    before = tmp_path / "before"
    shutil.copytree(ROOT / "protos", before / "protos")
    (before / "contracts").mkdir()
    shutil.copy(ROOT / "contracts" / "sla.toml", before / "contracts" / "sla.toml")
    after = tmp_path / "after"
    shutil.copytree(before, after)
    proto = after / "protos" / "holdfast" / "inventory" / "v1" / "inventory.proto"
    text = proto.read_text()
    text = text.replace(between(text, "  rpc Release(", "  }\n\n"), "")
    text = text.replace('idempotency_key: ["order_id", "sku_id", "timestamp_ms"]', 'idempotency_key: ["order_id", "sku_id"]')
    confirm = between(text, "  rpc Confirm(", "  }\n")
    text = text.replace(confirm, confirm.replace("timeout_ms: 2000", "timeout_ms: 3500").replace("max_attempts: 3", "max_attempts: 2"))
    text = text.replace("  RESERVATION_STATE_RELEASING = 6;\n", "")
    proto.write_text(text)
    sla = after / "contracts" / "sla.toml"
    sla.write_text(sla.read_text().replace("timeout_ms_max = 3000", "timeout_ms_max = 4000"))
    (repo / "pyproject.toml").parent.mkdir()
    (repo / "pyproject.toml").write_text('[tool.holdfast.lint]\nuse = ["CONTRACT", "SLA", "BREAKING"]\n')
    git(repo, "init", "-q")
    for tree, message in ((before, "before"), (after, "after")):
        shutil.copytree(tree, repo, dirs_exist_ok=True)
        git(repo, "add", "--all", "protos", "contracts", "pyproject.toml")
        git(repo, "commit", "-q", "-m", message)

    status, out, err = run("protos", "--against", "HEAD~1", "--sla", "contracts/sla.toml", cwd=repo)

    lines = text.splitlines()

    def at(needle: str, after_line: str = "") -> str:
        start = next(i for i, line in enumerate(lines) if after_line in line) if after_line else 0
        number = next(i for i in range(start, len(lines)) if needle in lines[i])
        return f"protos/holdfast/inventory/v1/inventory.proto:{number + 1}:{lines[number].index(needle) + 1}"

    service = "holdfast.inventory.v1.InventoryService"
    assert (status, err) == (1, "")
    assert out.splitlines() == [
        (f"{at('InventoryService')}: RPC_NO_DELETE RPC {service}/Release exists at HEAD~1 but not here: it was removed "
        "or renamed, which breaks its clients and the replay of its recorded calls."),
        (f"{at('idempotency_key', 'rpc Reserve(')}: CONTRACT_KEY_SAME_FIELDS Idempotency key of {service}/Reserve changed "
        'from ["order_id", "sku_id", "timestamp_ms"] at HEAD~1 to ["order_id", "sku_id"]; every recorded key of this '
        "RPC would no longer replay."),
        (f"{at('timeout_ms', 'rpc Confirm(')}: CONTRACT_TIMEOUT_NO_RAISE_PAST_SLA Contract of {service}/Confirm raised "
        'timeout_ms from 2000 at HEAD~1 to 3500, beyond timeout_ms_max 3000 of sla "inventory-write" at HEAD~1; '
        "clients size their deadlines by that SLA."),
        (f"{at('ReservationState {')}: ENUM_VALUE_NO_DELETE Enum value RESERVATION_STATE_RELEASING = 6 of "
        "holdfast.inventory.v1.ReservationState exists at HEAD~1 but not here; stored states and recorded replies "
        "that carry it would no longer decode."),
    ]


def test_renumbered_enum_values_and_retyped_key_fields_are_breaking(tmp_path):
    before = FIXTURES / "ENUM_VALUE_NO_DELETE" / "pass" / "before"
    after = tmp_path / "after"
    shutil.copytree(before, after)
    text = (after / PROTO).read_text()
    text = text.replace("ORDER_STATE_SHIPPED = 2;", "ORDER_STATE_SHIPPED = 3;")
    text = text.replace("message PlaceOrderRequest {\n  string order_id = 1;", "message PlaceOrderRequest {\n  int64 order_id = 1;")
    (after / PROTO).write_text(text)
    two_revisions(tmp_path / "repo", before, after)
    status, out, _ = run("protos", "--against", "HEAD~1", "--sla", SLA, "--config", CONFIG, cwd=tmp_path / "repo")
    assert status == 1
    assert out.splitlines() == [
        (f'protos/{PROTO}:12:25: CONTRACT_KEY_SAME_FIELDS Idempotency key field "order_id" of '
        "acme.v1.OrderService/PlaceOrder changed type from string at HEAD~1 to int64; every recorded key of this RPC "
        "would no longer replay."),
        (f"protos/{PROTO}:42:3: ENUM_VALUE_NO_DELETE Enum value ORDER_STATE_SHIPPED of acme.v1.OrderState changed number "
        "from 2 at HEAD~1 to 3; stored states and recorded replies carry the old number."),
    ]


def test_against_the_same_revision_reports_nothing_and_a_bad_ref_is_a_usage_error(tmp_path):
    tree = FIXTURES / "RPC_NO_DELETE" / "pass" / "before"
    two_revisions(tmp_path / "repo", tree, tree)
    args = ("protos", "--sla", SLA, "--config", CONFIG)
    assert run(*args, "--against", "HEAD~1", cwd=tmp_path / "repo") == (0, "", "")
    assert run(*args, "--against", "no-such-ref", cwd=tmp_path / "repo") == (
        2, "", "holdfast lint: --against no-such-ref: unknown git revision\n")


# -- waivers: ignore comments and configuration -------------------------------------------


IGNORE_COMMENTS = [
    # (rule, file in its fail fixture, the line the comment goes above: rpc, option, field, fault table)
    ("RPC_CONTRACT_REQUIRED", PROTO, "  rpc GetOrder("),
    ("CONTRACT_TIMEOUT_REQUIRED", PROTO, "    option (holdfast.contract.v1.contract) = {"),
    ("CONTRACT_LOCK_TTL_BELOW_TIMEOUT", PROTO, "  rpc PlaceOrder("),
    ("CONTRACT_KEY_FIELDS_SCALAR", PROTO, "  repeated string tags = 4;"),
    ("FAULT_DELAY_BELOW_TIMEOUT", "faults.toml", '["acme.v1.OrderService/PlaceOrder"]'),
]


def with_comment(tmp_path: Path, rule: str, file: str, above: str, comment: str) -> Path:
    folder = tmp_path / rule
    shutil.copytree(FIXTURES / rule / "fail", folder)
    text = (folder / file).read_text()
    indent = above[: len(above) - len(above.lstrip())]
    marker = "#" if file.endswith(".toml") else "//"
    (folder / file).write_text(text.replace(above, f"{indent}{marker} {comment}\n{above}", 1))
    return folder


@pytest.mark.parametrize(("rule", "file", "above"), IGNORE_COMMENTS)
def test_an_ignore_comment_on_the_declaration_waives_only_its_rule(tmp_path, rule, file, above):
    def lint_copy(folder: Path) -> tuple[int, str, str]:
        args = [folder.name, "--sla", SLA, "--config", CONFIG]
        if (folder / "faults.toml").exists():
            args += ["--faults", f"{folder.name}/faults.toml"]
        return run(*args, cwd=folder.parent)

    waived = with_comment(tmp_path / "waived", rule, file, above, f"holdfast:lint:ignore {rule} (reviewed)")
    assert lint_copy(waived) == (0, "", "")
    other = with_comment(tmp_path / "other", rule, file, above, "holdfast:lint:ignore CONTRACT_SLA_DEFINED")
    status, out, _ = lint_copy(other)
    assert status == 1 and [line.split()[1] for line in out.splitlines()] == [rule]


BROKEN_AND_WRONG = {
    "acme/v1/orders.proto": (FIXTURES / "CONTRACT_TIMEOUT_WITHIN_SLA" / "fail" / PROTO).read_text()
    .replace("lock_ttl_ms: 1000", "lock_ttl_ms: 5000"),
    "legacy/broken.proto": 'syntax = "proto3";\npackage legacy;\nmessage X { strin y = 1; }\n',
}


@pytest.mark.parametrize(("section", "rules_reported"), [
    ('ignore = ["protos/legacy"]', ["CONTRACT_TIMEOUT_WITHIN_SLA", "CONTRACT_LOCK_TTL_BELOW_TIMEOUT"]),
    ('use = ["SLA"]\nignore = ["protos/legacy"]', ["CONTRACT_TIMEOUT_WITHIN_SLA"]),
    ('except = ["SLA"]\nignore = ["protos/legacy/broken.proto"]', ["CONTRACT_LOCK_TTL_BELOW_TIMEOUT"]),
    ('use = ["CONTRACT", "SLA"]\nexcept = ["CONTRACT_LOCK_TTL_BELOW_TIMEOUT"]\nignore = ["protos/legacy", "protos/acme"]', []),
])
def test_pyproject_use_except_and_ignore(tmp_path, section, rules_reported):
    for name, text in BROKEN_AND_WRONG.items():
        (tmp_path / "protos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "protos" / name).write_text(text)
    (tmp_path / "pyproject.toml").write_text(f"[project]\nname = 'x'\n\n[tool.holdfast.lint]\n{section}\n")
    status, out, err = run("protos", "--sla", SLA, cwd=tmp_path)
    assert err == ""
    assert [line.split()[1] for line in out.splitlines()] == rules_reported
    assert status == (1 if rules_reported else 0)


# -- output formats and exit statuses ------------------------------------------------------


def test_json_and_github_formats_carry_the_same_finding():
    folder = FIXTURES / "CONTRACT_SLA_DEFINED" / "fail"
    (line,) = EXPECTED["CONTRACT_SLA_DEFINED"]
    message = line.split(" CONTRACT_SLA_DEFINED ", 1)[1]
    path = f"tests/lint_fixtures/CONTRACT_SLA_DEFINED/fail/{PROTO}"

    status, out, _ = run(*fixture_args(folder), "--format", "json")
    assert status == 1
    assert [json.loads(row) for row in out.splitlines()] == [
        {"path": path, "line": 15, "column": 7, "rule": "CONTRACT_SLA_DEFINED", "message": message}
    ]
    status, out, _ = run(*fixture_args(folder), "--format", "github")
    assert status == 1
    assert out == f"::error file={path},line=15,col=7,title=CONTRACT_SLA_DEFINED::{message}\n"


def test_github_annotations_escape_what_the_workflow_syntax_reserves():
    finding = lint.Finding("a,b:c.proto", 1, 2, "X_Y", "100% sure\nnext")
    assert lint.render([finding], "github") == "::error file=a%2Cb%3Ac.proto,line=1,col=2,title=X_Y::100%25 sure%0Anext\n"


def test_a_proto_that_does_not_compile_is_reported_with_protocs_own_message(tmp_path):
    (tmp_path / "protos" / "legacy").mkdir(parents=True)
    (tmp_path / "protos" / "legacy" / "broken.proto").write_text(BROKEN_AND_WRONG["legacy/broken.proto"])
    status, out, err = run("protos", cwd=tmp_path)
    assert (status, out) == (2, "")
    assert err == 'protos/legacy/broken.proto:3:13: "strin" is not defined.\n'


@pytest.mark.parametrize(("args", "reason"), [
    (["no/such/folder"], "no/such/folder: no such file or folder"),
    (["protos", "--format", "xml"], "argument --format: invalid choice: 'xml' (choose from 'text', 'json', 'github')"),
    (["protos", "--faults", "missing.toml"], "missing.toml: no such fault file"),
    (["protos", "--faults", "bad.toml"], 'bad.toml: not valid TOML: Expected \'=\' after a key in a key/value pair (at line 1, column 5)'),
    (["protos", "--faults", "text.toml"], 'text.toml: ["acme.v1.OrderService/PlaceOrder"]: delay_ms must be an integer of 0 or more, got \'2s\''),
    (["protos", "--sla", "missing.toml"], "missing.toml: no such SLA registry"),
    (["protos", "--config", "typo.toml"], "typo.toml: [tool.holdfast.lint]: unknown key 'excepts' (expected except, ignore, use)"),
    (["protos", "--config", "unknown.toml"], "unknown.toml: unknown rule or category 'CONTRACT_TIMEOUT' in [tool.holdfast.lint]"),
    (["protos", "--against", "HEAD"], "protos is not in a git repository"),
])
def test_usage_and_io_errors_exit_2_with_one_line(tmp_path, args, reason):
    shutil.copytree(FIXTURES / "CONTRACT_TIMEOUT_REQUIRED" / "pass", tmp_path / "protos")
    (tmp_path / "bad.toml").write_text("not toml\n")
    (tmp_path / "text.toml").write_text('["acme.v1.OrderService/PlaceOrder"]\ndelay_ms = "2s"\n')
    (tmp_path / "typo.toml").write_text("[tool.holdfast.lint]\nexcepts = []\n")
    (tmp_path / "unknown.toml").write_text('[tool.holdfast.lint]\nuse = ["CONTRACT_TIMEOUT"]\n')
    assert run(*args, cwd=tmp_path) == (2, "", f"holdfast lint: {reason}\n")


def test_help_and_the_rule_list_exit_0():
    status, out, _ = run("--help")
    assert status == 0 and out.startswith("usage: holdfast lint")
    status, out, _ = run("--list-rules")
    assert status == 0 and [line.split()[0] for line in out.splitlines()] == [rule.id for rule in ALL_RULES]
