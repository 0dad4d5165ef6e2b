"""The HSM layer under failure, against the real SoftHSM token: a PIN changed on the token while
the gateway runs, keys deleted or generated again by another process while their handles are
cached, the token removed under threads and async callers, and signatures whose r, s or RSA value
start with zero bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gateway.config import Settings, load_settings
from gateway.signing import hsm as hsm_module
from gateway.signing.errors import KeyNotFound
from gateway.signing.hsm import Hsm
from gateway.signing.softhsm import write_softhsm_conf
from gateway.signing.xmldsig import der_to_raw_ecdsa, raw_to_der_ecdsa


@pytest.fixture
def home_copy(softhsm_settings: Settings, rsa_key: str, ec_key: str, tmp_path: Path) -> Settings:
    """A copy of the session home and its token, for a child process to break (remove the token,
    change its PIN) without disturbing the session's own token."""
    home = tmp_path / "home"
    shutil.copytree(softhsm_settings.home, home, ignore=shutil.ignore_patterns("*.sqlite3*"))
    settings = load_settings(home)
    write_softhsm_conf(settings)
    return settings


def _child(script: str, settings: Settings, *args: str, timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, str(settings.home), *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "SOFTHSM2_CONF": str(settings.softhsm_conf)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Run by another process: what `softhsm2-util` or a second gateway does to the token meanwhile.
SET_PIN = ("import sys, pkcs11\n"
           "token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])\n"
           "with token.open(rw=True, user_pin=sys.argv[3]) as session:\n"
           "    session.set_pin(sys.argv[3], sys.argv[4])\n")

PIN_CHANGED = textwrap.dedent('''
    import json, os, subprocess, sys, time
    from gateway.config import load_settings
    from gateway.signing.errors import SigningError
    from gateway.signing.hsm import Hsm
    settings = load_settings(sys.argv[1]); label = sys.argv[2]; set_pin = sys.argv[3]
    pin = settings.hsm.user_pin
    def change(old, new):
        subprocess.run([sys.executable, "-c", set_pin, settings.hsm.module, settings.hsm.token_label, old, new],
                       check=True)
    hsm = Hsm.open(settings, sessions=2)
    hsm.reconnect_interval = 0.05
    log = {"before": len(hsm.sign(label, b"a"))}
    change(pin, pin + "-new")  # the gateway stays logged in until it reconnects
    store = settings.token_dir
    os.rename(store, str(store) + ".removed")  # a reconnect, which logs in again
    try:
        hsm.sign(label, b"b")
    except SigningError as exc:
        log["removed"] = exc.code
    os.rename(str(store) + ".removed", store)
    codes = []
    deadline = time.monotonic() + 1.0  # 20 reconnect intervals
    while time.monotonic() < deadline:
        try:
            hsm.sign(label, b"c")
            codes.append("signed")
        except SigningError as exc:
            codes.append(exc.code)
        time.sleep(0.01)
    log["refused"] = sorted(set(codes))
    # The token takes the configured PIN again: a gateway that kept offering it would now be
    # logged in, one that never offers a refused PIN again still says why it cannot sign.
    change(pin + "-new", pin)
    time.sleep(0.2)
    try:
        log["after_pin_restored"] = len(hsm.sign(label, b"d"))
    except SigningError as exc:
        log["after_pin_restored"] = exc.code
    hsm.close()
    print(json.dumps(log))
''')


RESTART = ("import json, sys\nfrom gateway.config import load_settings\nfrom gateway.signing.hsm import Hsm\n"
           "hsm = Hsm.open(load_settings(sys.argv[1]), sessions=1)\n"
           "print(json.dumps({'signed': len(hsm.sign(sys.argv[2], b'e'))}))\nhsm.close()\n")


def test_a_pin_refused_on_reconnect_is_hsm_login_failed_and_never_offered_again(
        home_copy: Settings, rsa_key: str) -> None:
    """The PIN changed on the token while the gateway runs: after the next reconnect every call
    said hsm_unavailable ("retry later") and the refused PIN was offered again every
    reconnect_interval, each time a failed login on the token's retry counter (a real HSM locks
    the user PIN after a few). Now every call is hsm_login_failed and the token is not asked
    again until a restart."""
    log = _child(PIN_CHANGED, home_copy, rsa_key, SET_PIN)
    assert log["before"] == 256 and log["removed"] == "hsm_unavailable"
    assert log["refused"] == ["hsm_login_failed"]
    assert log["after_pin_restored"] == "hsm_login_failed"  # not logged in behind the operator's back
    restarted = _child(RESTART, home_copy, rsa_key)  # a new process: the configured PIN works again
    assert restarted == {"signed": 256}


DELETE_OR_REGENERATE = textwrap.dedent('''
    import sys
    from pkcs11 import Attribute
    from gateway.config import load_settings
    from gateway.signing.hsm import Hsm
    hsm = Hsm.open(load_settings(sys.argv[1]), sessions=1)
    label, key_type = sys.argv[2], sys.argv[3]
    def delete(session, _conn):
        for obj in list(session.get_objects({Attribute.LABEL: label})):
            obj.destroy()
    hsm._admin(delete)
    if key_type != "-":
        hsm.generate_keypair(label, key_type)
    hsm.close()
''')


def _in_other_process(settings: Settings, label: str, key_type: str = "-") -> None:
    subprocess.run([sys.executable, "-c", DELETE_OR_REGENERATE, str(settings.home), label, key_type],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, "SOFTHSM2_CONF": str(settings.softhsm_conf)})


@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
def test_a_key_deleted_while_its_handle_is_cached_is_key_not_found(
        hsm: Hsm, softhsm_settings: Settings, ec_key: str, key_type: str) -> None:
    """Another process deletes a key whose handle the sessions cache. The next signature said
    hsm_unavailable and re-initialised the module for every user of the token (the stale handle
    was taken for a token gone); it is key_not_found, on the blocking and the batch path."""
    label = f"deleted-{key_type}-{os.getpid()}"
    hsm.generate_keypair(label, key_type)
    signer = hsm.signer(label)
    for _ in range(3):  # handles cached by both paths
        signer.verify(hsm.sign(label, b"x"), b"x")
        signer.verify(hsm.sign_batch([(label, b"x")])[0], b"x")
    epoch = hsm_module._module_epoch(hsm.module)
    _in_other_process(softhsm_settings, label)
    assert isinstance(hsm.sign_batch([(label, b"y")])[0], KeyNotFound)
    with pytest.raises(KeyNotFound):
        hsm.sign(label, b"y")
    with pytest.raises(KeyNotFound):
        signer.sign(b"y")
    with pytest.raises(KeyNotFound):
        hsm.signer(label)
    assert hsm_module._module_epoch(hsm.module) == epoch  # no reconnect for a deleted key
    hsm.signer(ec_key).verify(hsm.sign(ec_key, b"others sign on"), b"others sign on")


def test_a_key_deleted_under_the_batch_path_first_is_key_not_found(hsm: Hsm, softhsm_settings: Settings,
                                                                   ec_key: str) -> None:
    """The batch path meets the stale handle first (CKR_OBJECT_HANDLE_INVALID from its own
    C_SignInit): that job is key_not_found, and the jobs batched with it are signed."""
    label = f"deleted-batch-{os.getpid()}"
    hsm.generate_keypair(label, "p256")
    hsm.sign_batch([(label, b"x")])
    epoch = hsm_module._module_epoch(hsm.module)
    _in_other_process(softhsm_settings, label)
    first, second, third = hsm.sign_batch([(ec_key, b"a"), (label, b"b"), (ec_key, b"c")])
    assert isinstance(second, KeyNotFound)
    verify = hsm.signer(ec_key).verify
    verify(first, b"a")
    verify(third, b"c")
    assert hsm_module._module_epoch(hsm.module) == epoch


def test_a_key_generated_again_under_its_label_never_signs_for_the_old_signer(
        hsm: Hsm, softhsm_settings: Settings) -> None:
    """Another process deletes the key and generates a new one under the label. A signer made
    before (the HTTP layer keeps one a minute, with the old public key and certificate) must not
    get the new key's signature, which nobody could verify against its certificate: it is
    key_not_found. Signing by label, and a signer looked up now, use the new key."""
    label = f"regenerated-{os.getpid()}"
    hsm.generate_keypair(label, "p256")
    old = hsm.signer(label)
    old.verify(old.sign(b"x"), b"x")
    hsm.sign_batch([(label, b"x")])
    _in_other_process(softhsm_settings, label, "p256")
    with pytest.raises(KeyNotFound, match="replaced"):
        old.sign(b"y")
    new = hsm.signer(label)
    assert new.public_key.public_numbers() != old.public_key.public_numbers()
    new.verify(new.sign(b"z"), b"z")
    new.verify(hsm.sign(label, b"z"), b"z")
    new.verify(hsm.sign_batch([(label, b"z")])[0], b"z")


def test_signatures_with_leading_zero_bytes_verify_with_cryptography_and_openssl(
        hsm: Hsm, rsa_key: str, ec_key: str, tmp_path: Path) -> None:
    """About 1 P-256 signature in 128 has an r or s below 2^248 (a shorter DER integer, a zero
    first byte in r||s), and 1 RSA signature in 256 starts with a zero byte. Thousands are
    signed on both paths; each verifies with cryptography, the XML-DSig r||s form is 64 bytes
    and converts back, and the short ones verify with openssl too."""
    short: list[tuple[str, bytes, bytes]] = []
    for label, count in ((ec_key, 4000), (rsa_key, 1500)):
        signer = hsm.signer(label)
        for i in range(count):
            data = b"order %d" % i
            sig = hsm.sign(label, data) if i % 2 else hsm.sign_batch([(label, data)])[0]
            assert isinstance(sig, bytes)
            signer.verify(sig, data)
            if label == ec_key:
                raw = der_to_raw_ecdsa(sig)
                assert len(raw) == 64 and raw_to_der_ecdsa(raw) == sig
                if min(decode_dss_signature(sig)) < 2 ** 248:
                    short.append((label, data, sig))
            else:
                assert len(sig) == 256
                if sig[0] == 0:
                    short.append((label, data, sig))
    assert sum(1 for s in short if s[0] == ec_key) >= 5  # expected about 31
    for n, (label, data, sig) in enumerate(short):
        pem = tmp_path / f"{label}.pem"
        if not pem.exists():
            pem.write_bytes(hsm.public_key(label).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (tmp_path / "m").write_bytes(data)
        (tmp_path / "s").write_bytes(sig)
        proc = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pem), "-signature",
                               str(tmp_path / "s"), str(tmp_path / "m")], capture_output=True, text=True)
        assert proc.returncode == 0, (n, label, sig.hex(), proc.stdout, proc.stderr)


REMOVALS = textwrap.dedent('''
    import asyncio, collections, json, os, sys, threading, time
    from gateway.config import load_settings
    from gateway.signing.async_signer import AsyncSigner
    from gateway.signing.errors import SigningError
    from gateway.signing.hsm import Hsm
    settings = load_settings(sys.argv[1]); labels = sys.argv[2:4]; cycles = int(sys.argv[4])
    hsm = Hsm.open(settings, sessions=3)
    hsm.reconnect_interval = 0.05
    signers = {label: hsm.signer(label) for label in labels}
    codes, wrong, signed = collections.Counter(), [], [0]
    stop = threading.Event()
    def check(label, data, sig):
        try:
            signers[label].verify(sig, data); signed[0] += 1
        except Exception as exc:
            wrong.append(repr(exc))
    def blocking(n):
        i = 0
        while not stop.is_set():
            label, data = labels[i % 2], b"t%d-%d" % (n, i); i += 1
            try:
                check(label, data, hsm.sign(label, data))
            except SigningError as exc:
                codes[exc.code] += 1; time.sleep(0.005)
    async def awaiting(signer, n):
        i = 0
        while not stop.is_set():
            label, data = labels[i % 2], b"a%d-%d" % (n, i); i += 1
            try:
                check(label, data, await asyncio.wait_for(signer.sign(label, data), 60))
            except SigningError as exc:
                codes[exc.code] += 1; await asyncio.sleep(0.005)
    def fds():
        return len(os.listdir("/proc/self/fd"))
    async def main():
        signer = AsyncSigner(hsm, workers=2)
        threads = [threading.Thread(target=blocking, args=(n,)) for n in range(3)]
        [t.start() for t in threads]
        tasks = [asyncio.create_task(awaiting(signer, n)) for n in range(6)]
        await asyncio.sleep(0.3)
        log = {"recovered_s": [], "fds": []}
        store = settings.token_dir
        for _ in range(cycles):
            os.rename(store, str(store) + ".removed")
            await asyncio.sleep(0.2)
            os.rename(str(store) + ".removed", store)
            started, before = time.monotonic(), signed[0]
            while signed[0] == before and time.monotonic() - started < 30:
                await asyncio.sleep(0.01)
            log["recovered_s"].append(time.monotonic() - started)
            log["fds"].append(fds())
        stop.set()
        await asyncio.gather(*tasks)
        [t.join() for t in threads]
        signer.close()
        hsm.close()
        log.update(codes=sorted(codes), wrong=wrong[:3], signed=signed[0])
        print(json.dumps(log))
    asyncio.run(main())
''')


def test_token_removed_under_threads_and_async_callers_fails_cleanly_and_recovers(
        home_copy: Settings, rsa_key: str, ec_key: str) -> None:
    """Ten remove/restore cycles while blocking threads and async callers sign: the only error
    is hsm_unavailable, every signature returned verifies, signing resumes after each restore
    without a restart, and no file descriptor is left behind."""
    log = _child(REMOVALS, home_copy, rsa_key, ec_key, "10")
    assert log["wrong"] == []
    assert log["codes"] in (["hsm_unavailable"], [])
    assert max(log["recovered_s"]) < 30  # generous: a loaded 2-core machine
    assert log["signed"] > 0
    assert max(log["fds"]) - min(log["fds"]) <= 2


async def test_signatures_of_cancelled_callers_are_not_made(hsm: Hsm, rsa_key: str) -> None:
    """Callers whose asyncio.wait_for timed out while their jobs were queued: the worker still made
    every signature (3,000 RSA signatures, seconds of the token) before reaching the callers
    queued behind them. Those jobs are dropped; the worker, its session and the callers behind
    are unaffected (no CKR_OPERATION_ACTIVE on the next use)."""
    import asyncio
    import threading
    import time

    from gateway.signing.async_signer import AsyncSigner

    signer = AsyncSigner(hsm, workers=1)
    try:
        release = threading.Event()
        signer.submit(release.wait, 30)  # the worker is busy while the jobs queue up
        await asyncio.sleep(0.05)
        gone = [asyncio.ensure_future(asyncio.wait_for(signer.sign(rsa_key, b"gone %d" % i), 0.01))
                for i in range(3000)]
        results = await asyncio.gather(*gone, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results)
        behind = signer.sign(rsa_key, b"behind")
        started = time.monotonic()
        release.set()
        signature = await asyncio.wait_for(behind, 60)
        waited = time.monotonic() - started
        hsm.signer(rsa_key).verify(signature, b"behind")
        # Making them takes over 4 s (RSA-2048: about 700 a second per thread on this machine).
        assert waited < 2.0, waited
        assert signer.pending == 0
        for i in range(4):
            hsm.signer(rsa_key).verify(await signer.sign(rsa_key, b"next %d" % i), b"next %d" % i)
    finally:
        signer.close()
