"""The HSM layer against a real SoftHSM token: keys, signatures, certificates, threads, recovery."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gateway.config import Settings, load_settings
from gateway.signing.async_signer import AsyncSigner
from gateway.signing.errors import (CertificateMismatch, HsmError, HsmLoginError, KeyExists, KeyNotFound,
                                   TokenUnavailable)
from gateway.signing.hsm import Hsm
from pkcs11 import Attribute, ObjectClass


def _self_signed(private_key, public_key, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(private_key, hashes.SHA256()))


def test_rsa_signature_verifies_with_public_key(hsm: Hsm, rsa_key: str) -> None:
    signer = hsm.signer(rsa_key)
    assert signer.key_type == "rsa2048" and signer.algorithm == "rsa-sha256"
    assert isinstance(signer.public_key, rsa.RSAPublicKey) and signer.public_key.key_size == 2048
    signature = signer.sign(b"order 26X000123")
    assert len(signature) == 256
    signer.verify(signature, b"order 26X000123")
    with pytest.raises(InvalidSignature):
        signer.verify(signature, b"order 26X000124")


def test_ecdsa_signature_is_der_and_verifies(hsm: Hsm, ec_key: str) -> None:
    signer = hsm.signer(ec_key)
    assert signer.algorithm == "ecdsa-sha256"
    assert isinstance(signer.public_key, ec.EllipticCurvePublicKey)
    assert signer.public_key.curve.name == "secp256r1"
    signature = signer.sign(b"prescription")
    assert signature[0] == 0x30  # DER SEQUENCE of r, s
    signer.verify(signature, b"prescription")
    with pytest.raises(InvalidSignature):
        signer.verify(signature, b"prescriptioN")


def test_keys_are_generated_inside_sensitive_and_not_extractable(hsm: Hsm, rsa_key: str, ec_key: str) -> None:
    for label in (rsa_key, ec_key):
        protection = hsm.key_protection(label)
        assert protection == {"sensitive": True, "extractable": False, "always_sensitive": True,
                              "never_extractable": True, "local": True,
                              # signing keys only: no decryption, unwrapping or key agreement
                              "decrypt": False, "unwrap": False, "derive": False}


def test_duplicate_label_and_unknown_label_are_specific_errors(hsm: Hsm, rsa_key: str) -> None:
    with pytest.raises(KeyExists) as exists:
        hsm.generate_keypair(rsa_key, "rsa2048")
    assert exists.value.code == "key_exists"
    with pytest.raises(KeyNotFound) as missing:
        hsm.sign("no-such-key", b"x")
    assert missing.value.code == "key_not_found"


def test_certificate_stored_with_its_key_and_mismatch_refused(hsm: Hsm, rsa_key: str, ec_key: str) -> None:
    rsa_signer = hsm.signer(rsa_key)
    # The HSM key signs its own certificate through cryptography's builder: the private-key
    # adapter is what CSRs and CMS use too.
    cert = _self_signed(rsa_signer.private_key(), rsa_signer.public_key, "hsm self-signed")
    cert.verify_directly_issued_by(cert)
    hsm.store_certificate(rsa_key, cert)
    fresh = Hsm.open(load_settings(hsm_home(hsm)))
    try:
        assert fresh.certificate(rsa_key) == cert
        assert any(k.label == rsa_key and k.has_certificate for k in fresh.list_keys())
    finally:
        fresh.close()
    ec_signer = hsm.signer(ec_key)
    ec_cert = _self_signed(ec_signer.private_key(), ec_signer.public_key, "ec self-signed")
    with pytest.raises(CertificateMismatch):
        hsm.store_certificate(rsa_key, ec_cert)


def test_replacing_a_certificate_keeps_exactly_the_new_one(hsm: Hsm, softhsm_settings: Settings) -> None:
    label = "test-cert-replace"
    if label not in {k.label for k in hsm.list_keys()}:
        hsm.generate_keypair(label, "p256")
    signer = hsm.signer(label)
    first = _self_signed(signer.private_key(), signer.public_key, "first")
    second = _self_signed(signer.private_key(), signer.public_key, "second")
    hsm.store_certificate(label, first)
    hsm.store_certificate(label, second)
    fresh = Hsm.open(softhsm_settings)  # no cache: what the token holds
    try:
        assert fresh.certificate(label) == second
        (info,) = [k for k in fresh.list_keys() if k.label == label]
        assert info.subject == "CN=second"
        counted = fresh._admin(lambda session, _conn: len(list(session.get_objects(
            {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}))))
        assert counted == 1
    finally:
        fresh.close()


def hsm_home(hsm: Hsm) -> str:
    return os.path.dirname(os.environ["SOFTHSM2_CONF"])


def test_wrong_pin_is_refused_even_while_logged_in(softhsm_settings: Settings, hsm: Hsm) -> None:
    from dataclasses import replace
    bad = replace(softhsm_settings, hsm=replace(softhsm_settings.hsm, user_pin="0000"))
    with pytest.raises(HsmLoginError) as err:
        Hsm.open(bad)
    assert err.value.code == "hsm_login_failed"


def test_missing_token_label_is_a_clean_error(softhsm_settings: Settings, hsm: Hsm) -> None:
    from dataclasses import replace
    other = replace(softhsm_settings, hsm=replace(softhsm_settings.hsm, token_label="absent"))
    with pytest.raises(TokenUnavailable) as err:
        Hsm.open(other)
    assert "absent" in str(err.value)


def test_many_threads_sign_at_once_in_process(hsm: Hsm, rsa_key: str, ec_key: str) -> None:
    signers = {label: hsm.signer(label) for label in (rsa_key, ec_key)}
    failures: list[BaseException] = []
    barrier = threading.Barrier(12)

    def work(n: int) -> None:
        barrier.wait()
        for i in range(60):
            label = rsa_key if (n + i) % 2 else ec_key
            data = f"{n}-{i}".encode()
            try:
                signers[label].verify(hsm.sign(label, data), data)
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


HAMMER = textwrap.dedent('''
    import sys, threading
    from gateway.config import load_settings
    from gateway.signing.hsm import Hsm
    hsm = Hsm.open(load_settings(sys.argv[1]), sessions=int(sys.argv[2]))
    signers = [hsm.signer(label) for label in sys.argv[3:]]
    errors = []
    def work(n):
        for i in range(150):
            s = signers[(n + i) % len(signers)]
            data = b"%d/%d" % (n, i)
            try:
                if n % 2:  # half the threads take the pool's batch path (no GIL for the batch)
                    t = signers[(n + i + 1) % len(signers)]
                    a, b = hsm.sign_batch([(s.label, data), (t.label, data)])
                    s.verify(a, data)
                    t.verify(b, data)
                else:
                    s.verify(s.sign(data), data)
            except Exception as exc:
                errors.append(repr(exc))
    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    [t.start() for t in threads]; [t.join() for t in threads]
    hsm.close()
    print("errors", len(errors), errors[:3])
    sys.exit(1 if errors else 0)
''')


def test_sixteen_threads_on_separate_sessions_do_not_crash_the_process(
        softhsm_settings: Settings, rsa_key: str, ec_key: str) -> None:
    """Without OS locking this is the workload that corrupts SoftHSM's heap (domain.md §7); half
    the threads sign through python-pkcs11, half through the batch path (`pkcs11_batch`).

    It runs in a child process so that a crash fails this test instead of killing the run.
    """
    proc = subprocess.run([sys.executable, "-c", HAMMER, str(softhsm_settings.home), "4", rsa_key, ec_key],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SOFTHSM2_CONF": str(softhsm_settings.softhsm_conf)})
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "errors 0" in proc.stdout


async def test_async_signer_signs_concurrently_without_blocking_the_loop(hsm: Hsm, rsa_key: str) -> None:
    signer = AsyncSigner(hsm)
    try:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.001)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        payloads = [f"doc-{i}".encode() for i in range(400)]
        signatures = await asyncio.gather(*(signer.sign(rsa_key, p) for p in payloads))
        done.set()
        await tick_task
        verify = hsm.signer(rsa_key).verify
        for p, s in zip(payloads, signatures):
            verify(s, p)
        # 400 RSA signatures take a few hundred ms; a blocked loop would not tick in between.
        assert ticks >= 10
        assert signer.pending == 0
        with pytest.raises(KeyNotFound):
            await signer.sign("no-such-key", b"x")
    finally:
        signer.close()


RECOVERY = textwrap.dedent('''
    import os, sys, time, json
    from gateway.config import load_settings
    from gateway.signing.hsm import Hsm
    from gateway.signing.errors import TokenUnavailable
    settings = load_settings(sys.argv[1])
    label = sys.argv[2]
    hsm = Hsm.open(settings, sessions=2)
    hsm.reconnect_interval = 0.05
    log = {"before": len(hsm.sign(label, b"a"))}
    store = settings.token_dir
    os.rename(store, str(store) + ".removed")
    errors = []
    for _ in range(3):
        try:
            hsm.sign(label, b"b")
            errors.append("signed without a token")
        except TokenUnavailable as exc:
            errors.append(exc.code)
        time.sleep(0.06)
    log["while_removed"] = errors
    os.rename(str(store) + ".removed", store)
    time.sleep(0.06)
    log["after"] = len(hsm.sign(label, b"c"))
    log["available"] = hsm.available
    hsm.close()
    print(json.dumps(log))
''')


def test_removed_token_gives_clean_error_and_pool_recovers(softhsm_settings: Settings, rsa_key: str,
                                                           tmp_path: Path) -> None:
    """Runs on a copy of the token in a child process: removing the shared token would disturb others."""
    import json

    home = tmp_path / "home"
    shutil.copytree(softhsm_settings.home, home, ignore=shutil.ignore_patterns("*.sqlite3*"))
    settings = load_settings(home)
    from gateway.signing.softhsm import write_softhsm_conf
    write_softhsm_conf(settings)
    proc = subprocess.run([sys.executable, "-c", RECOVERY, str(home), rsa_key], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SOFTHSM2_CONF": str(settings.softhsm_conf)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads(proc.stdout.strip().splitlines()[-1])
    assert log["before"] == 256
    assert log["while_removed"] == ["hsm_unavailable"] * 3
    assert log["after"] == 256 and log["available"] is True


LOOKUP_RECOVERY = textwrap.dedent('''
    import os, sys, time, json
    from gateway.config import load_settings
    from gateway.signing.hsm import Hsm
    from gateway.signing.errors import SigningError
    settings = load_settings(sys.argv[1])
    label = sys.argv[2]
    hsm = Hsm.open(settings, sessions=2)  # nothing looked up yet on this connection
    hsm.reconnect_interval = 0.05
    def request():  # what /v1/sign does: the signer and its certificate, then the signature
        try:
            signer = hsm.signer(label)
            return len(signer.sign(b"doc"))
        except SigningError as exc:
            return exc.code
    store = settings.token_dir
    os.rename(store, str(store) + ".removed")
    log = {"while_removed": [request()]}
    os.rename(str(store) + ".removed", store)
    time.sleep(0.06)
    log["after"] = [request() for _ in range(2)]
    try:
        hsm.signer("no-such-label")
    except SigningError as exc:
        log["unknown_after"] = exc.code
    log["still_available"] = hsm.available and len(hsm.sign(label, b"e"))
    hsm.close()
    print(json.dumps(log))
''')


def test_a_token_gone_when_first_looked_up_is_unavailable_and_recovers(softhsm_settings: Settings, rsa_key: str,
                                                                      tmp_path: Path) -> None:
    """A software token whose files go away answers lookups with "nothing found", and keeps doing
    so after they are back until the module is initialised again: that must read as a missing
    token (hsm_unavailable, then recovery), never as key_not_found for good."""
    import json

    home = tmp_path / "home"
    shutil.copytree(softhsm_settings.home, home, ignore=shutil.ignore_patterns("*.sqlite3*"))
    settings = load_settings(home)
    from gateway.signing.softhsm import write_softhsm_conf
    write_softhsm_conf(settings)
    proc = subprocess.run([sys.executable, "-c", LOOKUP_RECOVERY, str(home), rsa_key], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "SOFTHSM2_CONF": str(settings.softhsm_conf)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads(proc.stdout.strip().splitlines()[-1])
    assert log["while_removed"][0] == "hsm_unavailable"
    assert log["after"] == [256, 256]
    assert log["unknown_after"] == "key_not_found"  # a token with keys: an unknown label is just that
    assert log["still_available"] == 256


RACE = textwrap.dedent('''
    import sys, threading, time, json
    from gateway.config import load_settings
    from gateway.signing import hsm as hsm_module
    from gateway.signing.hsm import Hsm
    hsm = Hsm.open(load_settings(sys.argv[1]), sessions=4)
    label = sys.argv[2]
    hsm.reconnect_interval = 0.0
    hsm.sign(label, b"warm")
    start = hsm_module._module_epoch(hsm.module)
    holding, release = threading.Event(), threading.Event()
    def holder():
        with hsm._session():  # a borrower still busy on the sessions that just died
            holding.set()
            release.wait()
    h = threading.Thread(target=holder); h.start(); holding.wait()
    hsm._mark_broken(hsm._conn.generation, RuntimeError("device failure"))
    errors = []
    def work():
        try:
            for i in range(30):
                hsm.sign(label, b"%d" % i)
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=work) for _ in range(6)]
    [t.start() for t in threads]
    time.sleep(0.3); release.set(); h.join(); [t.join() for t in threads]
    print(json.dumps({"reinitialisations": hsm_module._module_epoch(hsm.module) - start,
                      "errors": errors[:3]}))
    hsm.close()
''')


def test_threads_waiting_on_a_broken_pool_reconnect_it_once(softhsm_settings: Settings, rsa_key: str) -> None:
    """Six threads find the pool broken while a seventh still holds a dead session. One of them
    reconnects; the others use that connection instead of each re-initialising the module
    again (which closed sessions the first had just opened). In a child process: it
    re-initialises the module."""
    import json

    proc = subprocess.run([sys.executable, "-c", RACE, str(softhsm_settings.home), rsa_key],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SOFTHSM2_CONF": str(softhsm_settings.softhsm_conf)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads(proc.stdout.strip().splitlines()[-1])
    assert log == {"reinitialisations": 1, "errors": []}


def test_probe_is_a_real_signature(hsm: Hsm, rsa_key: str) -> None:
    hsm.probe(rsa_key)  # signs, and verifies the signature with the key's public key
    with pytest.raises(KeyNotFound):
        hsm.probe("no-such-key")


async def test_async_signer_refuses_work_after_close(hsm: Hsm, rsa_key: str) -> None:
    signer = AsyncSigner(hsm, workers=2)
    queued = [signer.sign(rsa_key, b"before close %d" % i) for i in range(8)]
    signer.close()
    # What was queued before close() still completes; nothing is accepted afterwards.
    assert all(len(s) == 256 for s in await asyncio.gather(*queued))
    with pytest.raises(RuntimeError, match="closed"):
        signer.sign(rsa_key, b"after close")


TOKEN_INIT = textwrap.dedent('''
    import sys
    from gateway.config import load_settings
    from gateway.signing.softhsm import ensure_softhsm_token
    print(ensure_softhsm_token(load_settings(sys.argv[1])))
''')


def test_concurrent_token_set_up_makes_one_token(tmp_path: Path) -> None:
    """Four `gateway init` at once on a new home: one creates the token, the others find it (two
    tokens with one label would make the home unusable)."""
    from gateway.config import write_default_config
    from gateway.signing.softhsm import _token_labels

    home = tmp_path / "home"
    write_default_config(load_settings(home))
    settings = load_settings(home)
    procs = [subprocess.Popen([sys.executable, "-c", TOKEN_INIT, str(home)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(out.strip() for out, _ in outputs) == ["False", "False", "False", "True"]
    assert _token_labels(settings.softhsm_conf).count(settings.hsm.token_label) == 1


GENERATE_AT = textwrap.dedent('''
    import sys, time
    from gateway.config import load_settings
    from gateway.signing.errors import KeyExists
    from gateway.signing.hsm import Hsm
    hsm = Hsm.open(load_settings(sys.argv[1]))
    hsm.list_keys()  # connected and logged in before the start line
    start = float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.0005)
    try:
        hsm.generate_keypair(sys.argv[2], "p256")
        print("generated")
    except KeyExists:
        print("key_exists")
''')


def test_two_processes_generating_one_label_at_once_make_one_key(softhsm_settings: Settings, hsm: Hsm) -> None:
    """Both passed the "label free" check before either generated, so the label ended up with two
    key pairs and was unusable. The home's key lock makes one generate and the other refused."""
    import time

    for attempt in range(3):
        label = f"race-{os.getpid()}-{attempt}"
        start = str(time.time() + 2.0)
        procs = [subprocess.Popen([sys.executable, "-c", GENERATE_AT, str(softhsm_settings.home), label, start],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "SOFTHSM2_CONF": str(softhsm_settings.softhsm_conf)})
                 for _ in range(2)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        assert sorted(out.strip() for out, _ in outputs) == ["generated", "key_exists"]
        assert [k.label for k in hsm.list_keys()].count(label) == 1
        hsm.signer(label).sign(b"usable")


async def test_async_signer_workers_can_run_below_the_loops_priority(hsm: Hsm, rsa_key: str) -> None:
    """`[hsm] worker_nice`: the workers (and the signing they do on their own CPU time) yield the
    cores to the event loop when both want them; the loop's own thread keeps its priority."""
    loop_thread = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, loop_thread)
    signer = AsyncSigner(hsm, workers=2, nice=3)
    try:
        def own_priority() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        assert await signer.run(own_priority) == before + 3
        assert len(await signer.sign(rsa_key, b"signed by a niced worker")) == 256
    finally:
        signer.close()
    assert os.getpriority(os.PRIO_PROCESS, loop_thread) == before


def test_token_set_up_keeps_the_pins_off_the_command_line(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Any local user can read a process's arguments: softhsm2-util gets the PINs at its prompts.
    A wrapper first on the PATH records the arguments the real tool is run with."""
    from gateway.config import write_default_config
    from gateway.signing.softhsm import ensure_softhsm_token

    real = shutil.which("softhsm2-util")
    assert real is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.log"
    wrapper = bin_dir / "softhsm2-util"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    home = tmp_path / "home"
    write_default_config(load_settings(home))
    settings = load_settings(home)
    assert ensure_softhsm_token(settings) is True
    calls = log.read_text()
    assert "--init-token" in calls
    assert settings.hsm.user_pin not in calls and settings.hsm.so_pin not in calls
    # The token took the PINs typed at the prompts: the user PIN logs in and signs (in a child
    # process: this process's module stays initialised for the session's own token).
    check = ("import sys; from gateway.config import load_settings; from gateway.signing.hsm import Hsm\n"
             "h = Hsm.open(load_settings(sys.argv[1]), sessions=1); h.generate_keypair('pin-check', 'p256')\n"
             "h.signer('pin-check').verify(h.sign('pin-check', b'x'), b'x'); h.close(); print('signed')")
    proc = subprocess.run([sys.executable, "-c", check, str(home)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "signed" in proc.stdout, proc.stderr[-2000:]


def test_token_pins_pass_as_written_and_bad_ones_are_refused_at_once(tmp_path: Path,
                                                                     softhsm_settings: Settings) -> None:
    """The terminal is raw: DEL, ^U and ^C in a PIN are PIN characters, not line editing or a
    signal. A PIN softhsm2-util would refuse (and ask again) is refused before it runs."""
    from gateway.signing.softhsm import _init_token

    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}/\nobjectstore.backend = file\nlog.level = ERROR\n")
    user_pin = "ab\x7fcd\x15ef\x03gh"
    _init_token(conf, "raw-pins", "so\x17-pin\x7f", user_pin)
    check = ("import sys, pkcs11\n"
             "token = pkcs11.lib(sys.argv[1]).get_token(token_label='raw-pins')\n"
             "with token.open(user_pin=sys.argv[2]):\n    print('logged in')")
    proc = subprocess.run([sys.executable, "-c", check, softhsm_settings.hsm.module, user_pin],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "SOFTHSM2_CONF": str(conf)})
    assert proc.returncode == 0 and "logged in" in proc.stdout, proc.stderr[-2000:]
    for so_pin, pin in (("12345678", "123"), ("12345678", "x" * 256), ("1234\n5678", "12345678")):
        with pytest.raises(HsmError) as e:
            _init_token(conf, "bad-pins", so_pin, pin)
        assert e.value.code == "hsm_pin_invalid"


def test_a_key_generation_cut_short_is_generated_again(hsm: Hsm) -> None:
    """A process killed inside C_GenerateKeyPair leaves SoftHSM with the public key under the
    label and an empty private key with no label: `keys generate` again said key_exists for
    good, and the empty key could be the one /readyz probed."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    label = f"cut-short-{os.getpid()}"
    hsm.generate_keypair(label, "p256")

    def cut_short(session, _conn) -> None:
        for key in list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})):
            key.destroy()
        session.create_object({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA,
                               Attribute.TOKEN: True, Attribute.MODULUS: b"", Attribute.PRIVATE_EXPONENT: b""})

    def unlabelled(session, _conn) -> int:
        return len(list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: ""})))

    hsm._admin(cut_short)
    assert hsm._admin(unlabelled) == 1
    public = hsm.generate_keypair(label, "p256")
    public.verify(hsm.sign(label, b"whole again"), b"whole again", ec.ECDSA(hashes.SHA256()))
    assert hsm._admin(unlabelled) == 0
    assert [k.label for k in hsm.list_keys()].count(label) == 1
