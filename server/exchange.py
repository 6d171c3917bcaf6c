"""One round's message exchange on the server, shared by pretraining (`server.pretraining`) and downstream
runs (`server.downstream`): wait for sites, sample them, send each ONE message (the round record and
the global weight sets), pull the replies one at a time and decode them (`brainjepa.federation.contract`).

What a run does with a reply (check it, add it to a mean, read its metrics) is the caller's `on_result`,
called as each reply is decoded, so that one site's weights at a time are held.
"""

from __future__ import annotations

import io
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from brainjepa.errors import ConfigError
from brainjepa.federation.contract import ARRAYS, CONFIG, METRICS, SITE, ErrorCode, Metric, RoundSpec, encode_global
from brainjepa.federation.names import check_site_name
from brainjepa.federation.reply_sets import ReplySets
from server.aggregate import SiteUpdate
from server.config import FederationConfig
from server.downlink import DownlinkRound
from server.registry import RegisteredSite, read_registry

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """Fewer valid site replies than min-sites: the global model is not updated."""


@dataclass
class SiteResult:
    node_id: int
    status: str  # ok | failed | declined (privacy budget spent) | rejected | timeout
    site: str = ""
    detail: str = ""
    update: SiteUpdate | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    quarantine: bool = True  # a rejection quarantines the site (not one for a duplicate name: see server.guard)


def wait_for_nodes(
    grid: Grid, n: int, timeout_s: float, exclude: frozenset[int] = frozenset(), why: str = ""
) -> list[int]:
    """Connected SuperNode ids, less `exclude` (quarantined: `why` names them), once at least `n` are
    connected (sorted, for reproducible sampling); RoundFailed after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    announced = False
    note = f" (not counting {why})" if exclude else ""
    while True:
        nodes = sorted(set(grid.get_node_ids()) - exclude)
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise RoundFailed(
                f"only {len(nodes)} eligible site(s) connected after {timeout_s:.0f} s{note}, min-sites is {n}"
            )
        if not announced:
            log.warning("waiting up to %.0f s for sites: %d of at least %d connected%s", timeout_s, len(nodes), n, note)
            announced = True
        time.sleep(1.0)


def sample_nodes(nodes: list[int], fraction: float, min_sites: int, rng: np.random.Generator) -> list[int]:
    k = min(len(nodes), max(min_sites, math.ceil(fraction * len(nodes))))
    picked = rng.choice(len(nodes), size=k, replace=False)  # indices: node ids are uint64 (no numpy floats)
    return sorted(nodes[int(i)] for i in picked)


def exchange(
    grid: Grid,
    cfg: FederationConfig,
    spec: RoundSpec,
    sets: Mapping[str, torch.Tensor],
    on_result: Callable[[SiteResult], None],
    fraction: float | None = None,
    message_type: str = "train",
    records: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    exclude: frozenset[int] = frozenset(),
    why: str = "",
    downlink: DownlinkRound | None = None,
) -> list[SiteResult]:
    """Send round `spec` with the global `sets` (and further ArrayRecords `records`, sent as they are,
    e.g. the federation's scaling statistics) to the sampled sites (a share `fraction`, default the
    run's `fraction-sites`, seeded by the round; never the `exclude`d nodes, which `why` names) and
    collect their replies, sorted by node. With an int8 `downlink` each site gets its payload (the delta
    or the fp32 resync) instead of `sets`."""
    nodes = wait_for_nodes(grid, cfg.min_sites, cfg.wait_for_sites_s, exclude, why)
    share = cfg.fraction_sites if fraction is None else fraction
    sampled = sample_nodes(nodes, share, cfg.min_sites, np.random.default_rng([cfg.seed, spec.round]))
    msgs, sent = round_messages(sampled, spec, sets, message_type, records, downlink)
    registry = read_registry(cfg.site_registry) if cfg.site_registry else None
    return collect(
        grid,
        msgs,  # emptied once pushed: the records' bytes are the SuperLink's to keep, not ours
        cfg.round_timeout_s,
        lambda reply, node: decode(reply, node, sent[node], spec.wire_dtype, sets, registry),
        on_result,
    )


def round_messages(
    sampled: list[int],
    spec: RoundSpec,
    sets: Mapping[str, torch.Tensor],
    message_type: str,
    records: Mapping[str, Mapping[str, torch.Tensor]] | None,
    downlink: DownlinkRound | None,
) -> tuple[list[Message], dict[int, int]]:
    """The round's message to each `sampled` node (the records shared between them) and its bytes."""
    conf = ConfigRecord(spec.to_record())
    in_sync = {node for node in sampled if downlink is not None and downlink.in_sync(node)}
    if downlink is not None:  # int8: the delta's record to nodes in sync, the fp32 reference's to the others
        arrays = downlink.records(sampled)
    else:
        full = ArrayRecord(encode_global(sets, spec.wire_dtype))
        arrays = dict.fromkeys(sampled, full)
    extra = {name: ArrayRecord(dict(tensors)) for name, tensors in (records or {}).items()}
    sent = {node: a.count_bytes() + sum(r.count_bytes() for r in extra.values()) for node, a in arrays.items()}
    log.info(
        "%s round %d/%d: sending %.1f MB to each of %d site(s)%s",
        spec.task,
        spec.round + 1,
        spec.num_rounds,
        max(sent.values(), default=0) / 1e6,
        len(sampled),
        f" ({len(in_sync)} as int8 deltas)" if downlink is not None else "",
    )
    msgs = [
        Message(
            RecordDict({ARRAYS: arrays[node], CONFIG: conf, **extra}),
            dst_node_id=node,
            message_type=message_type,
            group_id=f"{spec.task}-{spec.round}",
        )
        for node in sampled
    ]
    return msgs, sent


def collect(
    grid: Grid,
    msgs: list[Message],
    timeout_s: float,
    read: Callable[[Message, int], SiteResult],
    on_result: Callable[[SiteResult], None],
) -> list[SiteResult]:
    """Push the round's messages (then empty `msgs`: what was sent is not held here during the round) and
    pull replies (one at a time, each read, handed to `on_result` and released) until all came, a site
    left, or the timeout."""
    sent = [sum(r.count_bytes() for r in m.content.array_records.values()) for m in msgs]
    ids = list(grid.push_messages(msgs))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs, strict=True)}
    sent_of = dict(zip(ids, sent, strict=True))
    msgs.clear()
    pending = set(ids)
    results: list[SiteResult] = []
    deadline = time.monotonic() + timeout_s
    gone_since: dict[str, float] = {}
    while pending and time.monotonic() < deadline:
        for asked in list(pending):
            for reply in grid.pull_messages([asked]):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    res = refuse_duplicate(read(reply, node_of[mid]), results)
                    results.append(res)
                    on_result(res)
                del reply
        if not pending:
            break
        connected = set(grid.get_node_ids())
        now = time.monotonic()
        for mid in list(pending):
            if node_of[mid] in connected:
                gone_since.pop(mid, None)
            elif now - gone_since.setdefault(mid, now) > 5.0:  # left the federation mid-round
                pending.discard(mid)
                results.append(
                    SiteResult(node_of[mid], "failed", detail="site disconnected mid-round", bytes_sent=sent_of[mid])
                )
                log.warning("site node %d disconnected mid-round: dropped from this round", node_of[mid])
        time.sleep(0.5)
    for mid in pending:
        results.append(
            SiteResult(node_of[mid], "timeout", detail=f"no reply within {timeout_s:.0f} s", bytes_sent=sent_of[mid])
        )
        log.warning("site node %d: no reply within %.0f s, dropped from this round", node_of[mid], timeout_s)
    return sorted(results, key=lambda r: r.node_id)


def refuse_duplicate(res: SiteResult, earlier: list[SiteResult]) -> SiteResult:
    """`res` rejected if an earlier accepted reply of the round came under the same site name."""
    if res.status == "ok" and any(r.site == res.site and r.status == "ok" for r in earlier):
        res.status, res.update, res.quarantine = "rejected", None, False
        res.detail = f"a second reply as site '{res.site}' in this round (duplicate site name)"
        log.warning("site node %d rejected: %s", res.node_id, res.detail)
    return res


def reply_site(content: RecordDict, node_id: int, registry: Mapping[int, RegisteredSite] | None) -> str:
    """The site a reply is from: its node's registered name (the name it declares must agree), or without
    a registry (simulation, tests) the declared name, checked to be a safe name. ConfigError if not."""
    declared = content[SITE].get("name") if SITE in content.config_records else None
    if registry is None:
        return check_site_name(declared, f"reply of node {node_id}") if declared is not None else f"node-{node_id}"
    reg = registry.get(node_id)
    if reg is None:
        raise ConfigError(f"node {node_id} is not in the site registry (no registered key)")
    if declared is not None and declared != reg.site:
        raise ConfigError(
            f"node {node_id} is registered as site '{reg.site}' (key {reg.fingerprint}) but its "
            f"reply claims to be {str(declared)[:64]!r}"
        )
    return reg.site


def malformed(content: RecordDict) -> str:
    """Why a reply's records cannot be read (a missing weights or metrics record), or ""."""
    if METRICS not in content.metric_records or ARRAYS not in content.array_records:
        return f"malformed reply: records {sorted(content.keys())}, expected '{ARRAYS}' and '{METRICS}'"
    return ""


def decode(
    reply: Message,
    node_id: int,
    sent_bytes: int,
    wire_dtype: str,
    master: Mapping[str, torch.Tensor],
    registry: Mapping[int, RegisteredSite] | None = None,
) -> SiteResult:
    """A reply -> SiteResult: `failed` (error reply), `rejected` (malformed reply, wrong identity,
    undecodable weights) or `ok` with the site's weight sets (`ReplySets`: fp32 on reading, fp16 / int8 deltas
    added to `master`, which must stay unchanged until the reply is used), sample count and metrics."""
    if reply.has_error():
        reason = (reply.error.reason or "").strip()
        log.warning("site node %d failed: %s", node_id, reason.splitlines()[-1] if reason else reply.error.code)
        name = registry[node_id].site if registry and node_id in registry else ""
        status = "declined" if reply.error.code == ErrorCode.BUDGET_EXHAUSTED else "failed"  # out of privacy budget
        return SiteResult(node_id, status, name, detail=reason[-2000:], bytes_sent=sent_bytes)
    content = reply.content
    try:
        site = reply_site(content, node_id, registry)
    except ConfigError as e:
        log.warning("site node %d rejected: %s", node_id, e)
        return SiteResult(node_id, "rejected", detail=str(e), bytes_sent=sent_bytes)
    detail = malformed(content)
    if detail:
        log.warning("site %s rejected: %s", site, detail)
        return SiteResult(node_id, "rejected", site, detail, bytes_sent=sent_bytes)
    metrics = {k: float(v) for k, v in content[METRICS].items()}
    arrays = content[ARRAYS]
    received = arrays.count_bytes()
    try:  # each array leaves the message as it is read (no second copy of the reply), decoded only when used
        sets = ReplySets(take_tensors(arrays), wire_dtype, master)
    except (ValueError, TypeError) as e:
        return SiteResult(
            node_id, "rejected", site, f"undecodable weights: {e}", bytes_sent=sent_bytes, bytes_received=received
        )
    n = metrics.get(Metric.NUM_EXAMPLES, 0.0)
    update = SiteUpdate(site, int(n) if float(n).is_integer() else -1, sets, metrics)
    return SiteResult(node_id, "ok", site, update=update, bytes_sent=sent_bytes, bytes_received=received)


def take_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record's arrays as tensors over the bytes that came (read-only views: no copy), each array taken
    out of the record; Flower's own `to_torch_state_dict` would copy each array twice on the way."""
    out = {}
    for key in list(record.keys()):
        arr = record.pop(key)
        head = io.BytesIO(arr.data[:4096])  # the .npy header (magic, version, dict)
        version = np.lib.format.read_magic(head)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(head)
        if fortran or dtype.hasobject:  # not what our codecs send: Flower's own (checked, copying) reader
            out[key] = torch.from_numpy(arr.numpy())
            continue
        view = np.frombuffer(arr.data, dtype=dtype, count=math.prod(shape), offset=head.tell()).reshape(shape)
        with warnings.catch_warnings():  # read-only by design: replies are read, never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            out[key] = torch.from_numpy(view)
    return out


def ok_updates(results: list[SiteResult], min_sites: int, what: str, hint: str = "") -> list[SiteUpdate]:
    """The valid replies' updates; fewer than `min_sites` is a RoundFailed naming `what` (and a `hint`)."""
    ok = [r.update for r in results if r.status == "ok" and r.update is not None]
    if len(ok) < min_sites:
        raise RoundFailed(f"{what}: {len(ok)} valid repl(ies), fewer than min-sites={min_sites}{hint}")
    return ok


def count(results: list[SiteResult]) -> tuple[int, int, int]:
    """(ok, failed or timed out, rejected) sites of a round."""
    return (
        sum(r.status == "ok" for r in results),
        sum(r.status in ("failed", "declined", "timeout") for r in results),
        sum(r.status == "rejected" for r in results),
    )


def site_row(rnd: int, r: SiteResult) -> dict:
    """A site's row of `site_metrics.csv` (`server.report.SITE_FIELDS`)."""
    m = r.update.metrics if r.update is not None else {}
    return {
        "round": rnd + 1,
        "site": r.site or f"node-{r.node_id}",
        "node_id": r.node_id,
        "status": r.status,
        "loss": f"{m[Metric.LOSS]:.6f}" if Metric.LOSS in m else "",
        "local_steps": int(m.get(Metric.LOCAL_STEPS, 0)),
        "samples": int(m.get(Metric.NUM_EXAMPLES, 0)),
        "wall_s": f"{m.get(Metric.WALL_S, 0.0):.2f}",
        "bytes_sent": r.bytes_sent,
        "bytes_received": r.bytes_received,
        "detail": r.detail.splitlines()[-1][:300] if r.detail else "",
    }


def save_update(run_dir: Path, label: str, r: SiteResult) -> None:
    """`updates/<label>/<site>.pt` (label e.g. `round-001`): a site's decoded reply (run config
    `save-updates`, audits)."""
    out = run_dir / "updates" / label
    out.mkdir(parents=True, exist_ok=True)
    assert r.update is not None
    torch.save(
        {
            "site": r.site,
            "status": r.status,
            "num_examples": r.update.num_examples,
            "sets": {k: r.update.sets[k] for k in r.update.sets},  # decoded (fp32)
            "metrics": r.update.metrics,
        },
        out / f"{r.site}.pt",
    )
