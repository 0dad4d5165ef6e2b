"""`gateway demo`: the story end to end, through the real HTTP API, on the embedded defaults.

Every step says what it expects and what happened; the run succeeds only when every step
behaved. Each later capability adds its steps here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from lxml import etree

from gateway.config import Settings, load_settings

ORDER_NS = "urn:csos-gateway:order:1"


@dataclass
class Story:
    """What the steps share, and what they found."""

    settings: Settings
    demo: dict[str, Any]
    base: str = ""
    session: aiohttp.ClientSession | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def headers(self, client: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.demo['clients'][client]['token']}", **extra}

    async def call(self, method: str, path: str, client: str | None = None, *,
                   data: Any = None, content_type: str | None = None) -> tuple[int, dict[str, str], bytes]:
        assert self.session is not None
        headers = self.headers(client) if client else {}
        if content_type:
            headers["Content-Type"] = content_type
        async with self.session.request(method, self.base + path, data=data, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def demo_order_xml(demo: dict[str, Any], catalog_path: str, order_number: str, packages: int = 2) -> bytes:
    """An unsigned CSOS order (urn:csos-gateway:order:1) between the demo purchaser and supplier."""
    from gateway.catalog import load_catalog

    catalog = load_catalog(catalog_path)
    schedule_ii = [p for p in catalog.values() if p.schedule == "II"][:2]
    root = etree.Element(f"{{{ORDER_NS}}}CSOSOrder", nsmap={None: ORDER_NS})

    def sub(parent: etree._Element, tag: str, text: str | None = None) -> etree._Element:
        el = etree.SubElement(parent, f"{{{ORDER_NS}}}{tag}")
        if text is not None:
            el.text = text
        return el

    sub(root, "OrderNumber", order_number)
    sub(root, "SignedDate", dt.date.today().isoformat())
    for party in ("Purchaser", "Supplier"):
        key = demo["keys"][party.lower()]
        el = sub(root, party)
        sub(el, "DEANumber", key["dea_number"])
        sub(el, "Name", key["name"])
        addr = sub(el, "Address")
        for part in ("Line1", "City", "State", "PostalCode"):
            sub(addr, part, key["address"][part])
    items = sub(root, "Items")
    for line, product in enumerate(schedule_ii, start=1):
        item = sub(items, "Item")
        item.set("line", str(line))
        sub(item, "NDC", product.ndc)
        sub(item, "PackageSize", str(product.units_per_package))
        sub(item, "Packages", str(packages))
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _report_problem(report: dict[str, Any]) -> str:
    """A verification report that did not pass, in a line: its indication and failed checks."""
    failed = [f"{c.get('name')} ({c.get('code') or c.get('detail')})"
              for c in report.get("checks", []) if isinstance(c, dict) and not c.get("passed")]
    return (f"{report.get('indication')}: {report.get('code')}: {report.get('message')}"
            + (f"; failed checks: {', '.join(failed)}" if failed else ""))


class StepFailed(Exception):
    """A demo step saw something other than what it expects."""


def expect(condition: object, detail: object) -> None:
    """The check of a step. Not `assert`: `python -O` strips asserts, and the demo's exit status
    must mean the same with and without it."""
    if not condition:
        raise StepFailed(str(detail))


# --- the steps ---------------------------------------------------------------------------------

async def step_ready(story: Story) -> str:
    status, _, body = await story.call("GET", "/readyz")
    expect(status == 200, f"/readyz answered {status}: {body[:200]!r}")
    return "HSM signature and database write both succeed"


async def step_purchaser_signs_order(story: Story) -> str:
    label = story.demo["keys"]["purchaser"]["label"]
    number = f"{dt.date.today():%y}X{int(time.time()) % 1_000_000:06d}"
    for _ in range(5):
        order = demo_order_xml(story.demo, story.demo["catalog"], number)
        status, headers, body = await story.call("POST", f"/v1/sign?key={label}&format=xmldsig",
                                                 "purchaser", data=order, content_type="application/xml")
        if status != 409 or b"duplicate_document" not in body:
            break
        # This very order is signed already: another demo on this home numbered its order in
        # the same second. Another number makes another order.
        number = f"{dt.date.today():%y}X{secrets.randbelow(1_000_000):06d}"
    expect(status == 200, f"sign answered {status}: {body[:300]!r}")
    story.facts.update(order_number=number, signed_order=body, order_doc=headers["X-Document-Id"])
    return f"order {number} signed in the HSM with key '{label}' (RSA-SHA256, exclusive C14N); document {headers['X-Document-Id']}"


async def step_supplier_verifies(story: Story) -> str:
    status, _, body = await story.call("POST", "/v1/verify", "supplier", data=story.facts["signed_order"],
                                       content_type="application/xml")
    report = json.loads(body)
    expect(status == 200, f"verify answered {status}: {report}")
    indication = report.get("indication")
    expect(indication == "TOTAL_PASSED", _report_problem(report))
    signer = (report.get("signer") or {}).get("subject", "?")
    checks = ", ".join(c["name"] for c in report.get("checks", []) if c.get("passed"))
    return f"{indication}: signer {signer}; checks passed: {checks}"


async def step_xmlsec1_agrees(story: Story) -> str:
    xmlsec1 = shutil.which("xmlsec1")
    if xmlsec1 is None:
        return "xmlsec1 not installed: cross-check skipped"
    # xmlsec1 reads one certificate per --trusted-pem file: split the bundle.
    pems = Path(story.demo["trust_bundle"]).read_text().split("-----END CERTIFICATE-----")
    with tempfile.TemporaryDirectory() as tmp:
        args = [xmlsec1, "--verify", "--enabled-reference-uris", "empty"]
        for i, pem in enumerate(p for p in pems if "BEGIN CERTIFICATE" in p):
            path = Path(tmp, f"ca{i}.pem")
            path.write_text(pem.strip() + "\n-----END CERTIFICATE-----\n")
            args += ["--trusted-pem", str(path)]
        doc = Path(tmp, "order.xml")
        doc.write_bytes(story.facts["signed_order"])
        proc = await asyncio.to_thread(subprocess.run, [*args, str(doc)], capture_output=True, text=True)
    expect(proc.returncode == 0, proc.stderr[-500:])
    return "xmlsec1 --verify with the CA certificates as trusted PEMs: OK"


async def step_tampered_rejected(story: Story) -> str:
    tampered = story.facts["signed_order"].replace(b"<Packages>2</Packages>", b"<Packages>20</Packages>", 1)
    expect(tampered != story.facts["signed_order"], "the order has no <Packages>2</Packages> to change")
    status, _, body = await story.call("POST", "/v1/verify", "supplier", data=tampered,
                                       content_type="application/xml")
    error = json.loads(body).get("error", {})
    expect(status == 422 and error.get("code") == "signature_invalid", (status, error))
    return f"2 packages changed to 20 after signing: {status} {error['code']}"


async def step_foreign_key_refused(story: Story) -> str:
    label = story.demo["keys"]["supplier"]["label"]
    status, _, body = await story.call("POST", f"/v1/sign?key={label}&format=xmldsig", "purchaser",
                                       data=b"<Note>mine</Note>", content_type="application/xml")
    error = json.loads(body).get("error", {})
    expect(status == 403 and error.get("code") == "key_not_allowed", (status, error))
    return f"purchaser asking for the supplier's key: {status} {error['code']} (audited)"


async def step_other_client_cannot_read(story: Story) -> str:
    doc = story.facts["order_doc"]
    status, _, _ = await story.call("GET", f"/v1/documents/{doc}", "supplier")
    expect(status == 404, status)
    status, _, body = await story.call("GET", f"/v1/documents/{doc}", "purchaser")
    expect(status == 200 and body == story.facts["signed_order"], status)
    return "the signer reads its archived document byte for byte; another client gets 404"


async def step_cms_detached(story: Story) -> str:
    label = story.demo["keys"]["prescriber"]["label"]
    content = b"%%PDF-1.4 demo prescription summary for archiving, run %d\n" % time.time_ns()
    status, _, sig = await story.call("POST", f"/v1/sign?key={label}&format=cms", "prescriber_app",
                                      data=content, content_type="application/octet-stream")
    expect(status == 200, (status, sig[:200]))
    form = aiohttp.FormData()
    form.add_field("signature", sig, content_type="application/pkcs7-signature", filename="sig.p7s")
    form.add_field("content", content, content_type="application/octet-stream", filename="content.bin")
    status, _, body = await story.call("POST", "/v1/verify", "pharmacy", data=form)
    report = json.loads(body)
    expect(status == 200, f"verify answered {status}: {report}")
    expect(report.get("indication") == "TOTAL_PASSED", _report_problem(report))
    return f"detached CMS SignedData ({len(sig)} bytes DER) verified: {report['indication']}"


async def step_som_holds_large_order(story: Story) -> str:
    import polars as pl

    from gateway.som.score import score_orders
    from gateway.som.synth import synthesize

    history = synthesize(customers=60, days=400, seed=7)
    history = history.filter(~pl.col("label")) if "label" in history.columns else history
    customer = history.group_by("customer").len().sort("len", descending=True)["customer"][0]
    mine = history.filter(pl.col("customer") == customer)
    family = mine.group_by("family").agg(pl.col("dosage_units").sum()).sort("dosage_units")["family"][-1]
    usual = mine.filter(pl.col("family") == family)
    last = usual.sort("date").tail(1)
    big = last.with_columns(
        pl.lit("DEMO-HOLD").alias("order_id"),
        (pl.col("date") + pl.duration(days=3)).alias("date"),
        (pl.col("dosage_units") * 0 + usual["dosage_units"].mean() * 6).cast(usual["dosage_units"].dtype)
        .alias("dosage_units"))
    scored = score_orders(pl.concat([history, big.select(history.columns)], how="vertical_relaxed"))
    held = scored.filter(pl.col("order_id") == "DEMO-HOLD")
    expect(held.height == 1 and bool(held["flag"][0]), held)
    story.facts["som_reasons"] = held["reasons"][0]
    return f"customer {customer}, {family}: held with score {held['score'][0]:.2f}: {held['reasons'][0]}"


async def step_audit_intact(story: Story) -> str:
    from gateway.audit import AuditKey, make_checkpoint, verify_trail
    from gateway.signing.hsm import Hsm
    from gateway.storage import open_storage

    hsm = await asyncio.to_thread(Hsm.open, story.settings, sessions=1)
    try:
        signer = await asyncio.to_thread(hsm.signer, story.demo.get("audit_key", "audit"))
        storage = open_storage(story.settings)
        await storage.open()
        try:
            # Pin the story's records with a checkpoint signed by the HSM audit key, then check
            # every record and every checkpoint signature.
            await make_checkpoint(storage, AuditKey.from_signer(signer), actor="demo", force=True)
            result = await verify_trail(storage, signer.public_key)
        finally:
            await storage.close()
    finally:
        await asyncio.to_thread(hsm.close)
    where = f" at record {result.first_bad_seq}" if result.first_bad_seq is not None else ""
    expect(result.ok, f"audit trail BROKEN{where}: {result.problem}: {result.message}")
    expect(result.checkpoints_checked >= 1, "no signed checkpoint was checked")
    return f"audit trail intact: {result.records_checked} records chained, {result.checkpoints_checked} signed checkpoints"


STEPS: list[tuple[str, Callable[[Story], Awaitable[str]]]] = [
    ("gateway ready", step_ready),
    ("purchaser signs a CSOS order with its HSM key", step_purchaser_signs_order),
    ("supplier verifies signature, chain, CRL and key usage", step_supplier_verifies),
    ("an independent verifier agrees", step_xmlsec1_agrees),
    ("a tampered order is rejected", step_tampered_rejected),
    ("a client cannot use another client's key", step_foreign_key_refused),
    ("archived documents are private to their signer", step_other_client_cannot_read),
    ("prescriber app signs a detached CMS, pharmacy verifies it", step_cms_detached),
    ("suspicious order monitoring holds an abnormally large order", step_som_holds_large_order),
    ("the audit trail verifies end to end", step_audit_intact),
]


async def _play(settings: Settings, demo: dict[str, Any], keep_going: bool) -> list[tuple[str, bool, str]]:
    from dataclasses import replace

    from gateway.http.app import create_app

    settings = replace(settings, server=replace(settings.server, host="127.0.0.1", port=0))
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
    story = Story(settings=settings, demo=demo, base=f"http://127.0.0.1:{port}")
    print(f"gateway listening on {story.base} (home {settings.home})\n")
    try:
        async with aiohttp.ClientSession() as session:
            story.session = session
            for n, (title, step) in enumerate(STEPS, start=1):
                try:
                    detail = await step(story)
                    ok = True
                except StepFailed as exc:  # what the step saw instead of what it expects
                    detail, ok = str(exc), False
                except Exception as exc:  # noqa: BLE001 - a demo step failing is reported, not raised
                    detail, ok = f"{type(exc).__name__}: {exc}", False
                story.results.append((title, ok, detail))
                print(f"{n:2}. [{'ok' if ok else 'FAILED'}] {title}\n      {detail}")
                if not ok and not keep_going:
                    break
    finally:
        await runner.cleanup()
    return story.results


def run_demo(settings: Settings, *, keep_going: bool = False) -> bool:
    from gateway.bootstrap import init_home

    demo = init_home(settings=settings)
    settings = load_settings(settings.home)
    results = asyncio.run(_play(settings, demo, keep_going))
    ok = len(results) == len(STEPS) and all(r[1] for r in results)
    print(f"\n{'every step behaved' if ok else 'SOME STEPS MISBEHAVED'}: "
          f"{sum(r[1] for r in results)}/{len(STEPS)} steps ok")
    return ok


__all__ = ["run_demo", "demo_order_xml", "STEPS"]
