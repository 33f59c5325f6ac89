"""The `moc-node` command: run a node, or talk to a running one over HTTP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console
from rich.table import Table
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

DEFAULT_URL = "http://127.0.0.1:8008"
LIST_PAGE = 1000  # the most a node sends in one page of a list


log = logging.getLogger(__name__)


class ClientError(Exception):
    """The node answered with an error, or could not be reached."""


class NotReady(ClientError):
    """The node cannot be reached yet, or answers that it is not ready (503): worth a retry."""


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    console = Console()
    try:
        client = _Client(args.url, args.api_key, _tls_context(args))
        if args.wait:
            wait_ready(client, args.wait)
        return int(args.handler(client, args, console))
    except ClientError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moc-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a node in the foreground")
    run.add_argument("--config", help="TOML config file (defaults are embedded)")
    run.add_argument("--log-level", default=os.environ.get("MOC_LOG_LEVEL", "INFO"))
    run.add_argument(
        "--witness",
        action="store_true",
        help="only vote in primary elections (the third voter of a two-host cluster)",
    )

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--url", default=os.environ.get("MOC_URL", DEFAULT_URL))
        p.add_argument("--api-key", default=os.environ.get("MOC_API_KEY"))
        # For an https:// URL: the CA that signed the node's certificate (else the system's),
        # and this client's certificate when the node asks for one (tls_client_ca_file).
        env = os.environ.get
        p.add_argument("--ca-file", default=env("MOC_CA_FILE"), help="PEM CA bundle")
        p.add_argument("--cert-file", default=env("MOC_CERT_FILE"), help="PEM client cert")
        p.add_argument("--key-file", default=env("MOC_KEY_FILE"), help="PEM client key")
        p.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="first wait up to SECONDS for the node to be ready (it may be starting)",
        )
        return p

    client("status", "show the node's health, devices and models").set_defaults(handler=_status)
    client("models", "list models and their state").set_defaults(handler=_models)
    client("cluster", "show the cluster: members, primary, models").set_defaults(handler=_cluster)
    jobs = client("jobs", "list learning jobs, or submit / watch / cancel one")
    jobs.add_argument(
        "op", nargs="?", choices=["list", "submit", "watch", "cancel"], default="list"
    )
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--type", dest="job_type", default="lora")
    jobs.add_argument("--model", dest="model_name")
    jobs.add_argument("--dataset", dest="dataset_path")
    jobs.add_argument("--steps", type=int)
    jobs.add_argument("--output-name")
    jobs.set_defaults(handler=_jobs)
    goals = client("goals", "list goals, or create / cancel one")
    goals.add_argument("op", nargs="?", choices=["list", "create", "cancel"], default="list")
    goals.add_argument("goal_id", nargs="?")
    goals.add_argument("--title")
    goals.add_argument("--priority", default="medium")
    goals.add_argument("--model", dest="model_name")
    goals.add_argument("--dataset", dest="dataset_path")
    goals.set_defaults(handler=_goals)
    top = client("top", "watch the cluster live (Ctrl-C to quit)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--iterations", type=int, default=0, help="stop after N refreshes (0: never)")
    top.set_defaults(handler=_top)
    load = client("load", "load a model")
    load.add_argument("name")
    load.add_argument("--path", help="model file inside the node's model directories")
    load.add_argument(
        "--type",
        dest="model_type",
        help="llm (the default: the backend follows from the file), gguf or torch",
    )
    load.set_defaults(handler=_load)
    unload = client("unload", "unload a model")
    unload.add_argument("name")
    unload.set_defaults(handler=_unload)
    infer = client("infer", "run one completion")
    infer.add_argument("name")
    infer.add_argument("text")
    infer.add_argument("--max-tokens", type=int, default=50)
    infer.add_argument("--temperature", type=float, default=0.7)
    infer.set_defaults(handler=_infer)
    return parser


def configure_logging(level: str) -> None:
    """Log at `level`, without the tracebacks that libraries log for a client's bad input."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # aiohttp logs each malformed request with a traceback: junk from anyone would flood the
    # log. Refusals are answered and counted in moc_rest_requests_total instead.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    # pykka logs every exception an actor hands back to its caller at INFO, with a traceback
    # ("unknown job" included); the caller answers it and logs what deserves it. pykka's own
    # failures (an actor that crashed) are logged at ERROR and still show.
    logging.getLogger("pykka").setLevel(logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    from moc_node.app import run
    from moc_node.config import ConfigError

    try:
        return run(args.config, witness=args.witness)
    except ConfigError as exc:
        # One line whatever a quoted value holds: the message is read in journals and scripts.
        message = " ".join(str(exc).splitlines())
        print(f"moc-node: config error: {message}", file=sys.stderr)
        return 2


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """Return the context for an https:// node from --ca-file/--cert-file/--key-file, or None
    (urllib's default: the system's CAs) when none is given."""
    if not (args.ca_file or args.cert_file):
        return None
    try:
        context = ssl.create_default_context(cafile=args.ca_file)
        if args.cert_file:
            context.load_cert_chain(args.cert_file, args.key_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ClientError(f"cannot use the TLS files: {exc}") from None
    return context


class _Client:
    def __init__(self, url: str, api_key: str | None, tls: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self._key = api_key
        self._tls = tls

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 600
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self._key:
            request.add_header("X-API-Key", self._key)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._tls) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            error = NotReady if exc.code == 503 else ClientError
            raise error(f"HTTP {exc.code}: {_error_text(exc.read())}") from None
        except urllib.error.URLError as exc:
            raise NotReady(f"cannot reach {self.url}: {exc.reason}") from None
        except (TimeoutError, ConnectionError) as exc:  # once connected, while reading
            raise NotReady(f"cannot reach {self.url}: {exc}") from None


READY_POLL_S = (0.1, 2.0)
"""First and longest pause between readiness checks: a node that is just binding its port is
caught at once; one restoring its models for minutes is asked every two seconds at most."""


def wait_ready(client: _Client, seconds: float) -> None:
    """Return once the node answers GET /ready with 200; NotReady after `seconds` of trying.

    Refused connections and 503s (a node binding its ports, restoring its models, joining its
    cluster) are retried with exponential backoff and jitter; any other answer (a wrong key,
    say) ends the wait at once.
    """
    first, longest = READY_POLL_S
    retrying = Retrying(
        stop=stop_after_delay(seconds),
        wait=wait_exponential_jitter(multiplier=first, max=longest, jitter=first),
        retry=retry_if_exception_type(NotReady),
        before_sleep=lambda state: log.info(
            "node at %s not ready (%s); retrying",
            client.url,
            state.outcome.exception() if state.outcome else None,
        ),
        reraise=True,
    )
    deadline = time.monotonic() + seconds
    try:
        for attempt in retrying:
            with attempt:
                # Each check may take what is left of the wait, and no more.
                left = max(0.1, deadline - time.monotonic())
                client.call("GET", "/ready", timeout=min(left, 10.0))
    except NotReady as exc:
        raise NotReady(f"node at {client.url} not ready after {seconds:g} s: {exc}") from None


def _list_all(client: _Client, path: str, key: str, page: int = LIST_PAGE) -> list[Any]:
    """Return every item of a paged list (`limit`/`offset`, `next_offset`), page by page.

    A node from before paging answers the whole list with no `next_offset`: one call.
    """
    items: list[Any] = []
    offset: Any = 0
    while True:
        body = client.call("GET", f"{path}?limit={page}&offset={offset}")
        if isinstance(body, list):  # an old node's bare list
            return body
        items.extend(body[key])
        following = body.get("next_offset")
        if not isinstance(following, int) or following <= offset:  # the last page (or junk)
            return items
        offset = following


def _error_text(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))
        if error:
            return str(error)
        if body.get("detail"):
            return str(body["detail"])
    return json.dumps(body)


def _models_table(models: list[dict[str, Any]]) -> Table:
    table = Table(title="models")
    for column in ("name", "state", "device", "backend", "est MiB", "MiB", "pinned", "in flight"):
        table.add_column(column)
    for m in models:
        table.add_row(
            str(m.get("name")),
            str(m.get("state")),
            str(m.get("device") or "-"),
            str(m.get("backend")),
            _num(m.get("estimate_mb")),
            _num(m.get("memory_mb")),
            "yes" if m.get("pinned") else "",
            str(m.get("in_flight", 0)),
        )
    return table


def slots_table(models: list[dict[str, Any]]) -> Table:
    """Render the loaded models' slots: busy of all, and requests waiting for one."""
    table = Table(title="slots")
    for column in ("model", "state", "slots busy", "waiting", "in flight"):
        table.add_column(column)
    for m in models:
        if m.get("state") not in ("loaded", "loading"):
            continue
        slots = m.get("slots")
        in_flight = int(m.get("in_flight") or 0)
        queued = int(m.get("queued") or 0)  # waiting for the model to load
        if slots:
            busy = f"{min(in_flight, slots)}/{slots}"
            waiting = max(0, in_flight - slots) + queued
        else:
            busy, waiting = "-", queued
        table.add_row(str(m.get("name")), str(m.get("state")), busy, str(waiting), str(in_flight))
    return table


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f}"


def _status(client: _Client, args: argparse.Namespace, console: Console) -> int:
    health = client.call("GET", "/health")
    console.print(f"[bold]health:[/bold] {health.get('status')}")
    for name, component in (health.get("components") or {}).items():
        console.print(f"  {name}: {component}")
    status = client.call("GET", "/status")
    table = Table(title=f"devices of {status.get('name')}")
    for column in ("device", "kind", "total MiB", "used MiB", "claimed MiB", "free MiB"):
        table.add_column(column)
    for d in status.get("devices", []):
        table.add_row(
            str(d["name"]),
            str(d["kind"]),
            _num(d["total_mb"]),
            _num(d["used_mb"]),
            _num(d["claimed_mb"]),
            _num(d["free_mb"]),
        )
    console.print(table)
    console.print(_models_table(status.get("models", [])))
    return 0


def cluster_table(view: dict[str, Any]) -> Table:
    """Render a /cluster view: one row per member with its devices and models."""
    primary = view.get("primary") or {}
    title = (f"primary {primary['name']} (term {primary['term']})" if primary else "no primary") + (
        "" if view.get("enabled") else " · single node"
    )
    table = Table(title=title)
    for column in ("member", "state", "inc", "devices (claimed / used / total MiB)", "models"):
        table.add_column(column)
    for m in view.get("members", []):
        devices = "\n".join(
            f"{d['name']}: {_num(d.get('claimed_mb'))} / {_num(d.get('used_mb'))} / "
            f"{_num(d.get('total_mb'))}"
            for d in m.get("devices", [])
        )
        models = "\n".join(
            f"{x['name']} {x.get('state', '')} q={x.get('queued', 0)}" for x in m.get("models", [])
        )
        name = m["name"] + (" *" if primary.get("name") == m["name"] else "")
        table.add_row(name, str(m.get("state")), str(m.get("incarnation", 0)), devices, models)
    return table


def _cluster(client: _Client, args: argparse.Namespace, console: Console) -> int:
    console.print(cluster_table(client.call("GET", "/cluster")))
    return 0


def _jobs(client: _Client, args: argparse.Namespace, console: Console) -> int:
    if args.op == "submit":
        spec: dict[str, Any] = {
            "job_type": args.job_type,
            "model_name": args.model_name,
            "dataset_path": args.dataset_path,
            "training_params": {"steps": args.steps} if args.steps else {},
        }
        if args.output_name:
            spec["output_name"] = args.output_name
        job = client.call("POST", "/learning/jobs", spec)
        console.print(f"job {job['job_id']} {job['status']}")
        args.job_id = job["job_id"]
        return _watch_job(client, args.job_id, console)
    if args.op in ("watch", "cancel") and not args.job_id:
        raise ClientError(f"jobs {args.op} needs a job id")
    if args.op == "watch":
        return _watch_job(client, args.job_id, console)
    if args.op == "cancel":
        job = client.call("POST", f"/learning/jobs/{args.job_id}/cancel", {})
        console.print(f"job {job['job_id']} {job['status']}")
        return 0
    table = Table(title="learning jobs")
    for column in ("job", "type", "model", "status", "step", "loss", "output"):
        table.add_column(column)
    for j in _list_all(client, "/learning/jobs", "jobs"):
        loss = j.get("loss")
        table.add_row(
            j["job_id"],
            j["job_type"],
            j["model_name"],
            j["status"],
            f"{j.get('step', 0)}/{j.get('total_steps', '?')}",
            "-" if loss is None else f"{loss:.3f}",
            str(j.get("output_name") or ""),
        )
    console.print(table)
    return 0


def _watch_job(client: _Client, job_id: str, console: Console) -> int:
    """Show a live progress bar until the job ends; exit 0 only if it completed."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"job {job_id}", total=1.0, info="")
        while True:
            job = client.call("GET", f"/learning/jobs/{job_id}")
            loss = job.get("loss")
            info = f"{job['status']} step {job.get('step', 0)}/{job.get('total_steps', '?')}"
            if loss is not None:
                info += f" loss {loss:.3f}"
            progress.update(task, completed=float(job.get("progress") or 0.0), info=info)
            if job["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.5)  # the refresh period of a terminal view
    if job["status"] != "completed":
        console.print(f"[red]job {job['status']}:[/red] {job.get('error') or ''}")
        return 1
    console.print(f"job completed: model {job.get('output_name')} is servable")
    return 0


def _goals(client: _Client, args: argparse.Namespace, console: Console) -> int:
    if args.op == "create":
        body = {
            "title": args.title or f"improve {args.model_name}",
            "priority": args.priority,
            "metadata": {"model_name": args.model_name, "dataset_path": args.dataset_path},
        }
        goal = client.call("POST", "/goals", body)
        console.print(f"goal {goal['goal_id']} {goal['status']}")
        return 0
    if args.op == "cancel":
        if not args.goal_id:
            raise ClientError("goals cancel needs a goal id")
        goal = client.call("POST", f"/goals/{args.goal_id}/cancel", {})
        console.print(f"goal {goal['goal_id']} {goal['status']}")
        return 0
    table = Table(title="goals")
    for column in ("goal", "title", "priority", "status", "step", "error"):
        table.add_column(column)
    for g in _list_all(client, "/goals", "goals"):
        table.add_row(
            g["goal_id"],
            g.get("title", ""),
            str(g.get("priority")),
            g["status"],
            str(g.get("current_step", "")),
            str(g.get("error") or ""),
        )
    console.print(table)
    return 0


def _top(client: _Client, args: argparse.Namespace, console: Console) -> int:
    from rich.console import Group
    from rich.live import Live

    done = 0
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        while True:
            try:
                cluster = cluster_table(client.call("GET", "/cluster"))
                live.update(Group(cluster, slots_table(_list_all(client, "/models", "models"))))
            except ClientError as exc:
                live.update(f"[red]{exc}[/red]")
            done += 1
            if args.iterations and done >= args.iterations:
                return 0
            try:
                time.sleep(args.interval)  # the refresh period of a terminal view
            except KeyboardInterrupt:
                return 0


def _models(client: _Client, args: argparse.Namespace, console: Console) -> int:
    models = _list_all(client, "/models", "models")
    console.print(_models_table(models))
    return 0


def _load(client: _Client, args: argparse.Namespace, console: Console) -> int:
    payload: dict[str, Any] = {"model_name": args.name}
    if args.path:
        payload["model_path"] = args.path
    if args.model_type:
        payload["model_type"] = args.model_type
    result = client.call("POST", "/models", payload)
    console.print(result)
    return 0


def _unload(client: _Client, args: argparse.Namespace, console: Console) -> int:
    console.print(client.call("DELETE", f"/models/{args.name}"))
    return 0


def _infer(client: _Client, args: argparse.Namespace, console: Console) -> int:
    payload = {
        "model_name": args.name,
        "input_text": args.text,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
    }
    result = client.call("POST", "/inference", payload)
    body = result.get("result", result) if isinstance(result, dict) else result
    console.print(body.get("output_text", body) if isinstance(body, dict) else body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
