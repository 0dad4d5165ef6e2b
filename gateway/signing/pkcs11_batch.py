"""C_SignInit + C_Sign for a whole batch in one call that holds no GIL.

python-pkcs11 releases the GIL inside each PKCS#11 call, but takes it back around C_SignInit,
C_Sign and the Python work between them: about 40 us per signature on this machine, and four GIL
hand-offs, each a wait when the event loop holds the GIL. For a P-256 key on a software token
(about 120 us a signature) that is a third of the cost. A worker of the async pool signs its batch
here instead: one Numba-compiled loop calls the module's own C_SignInit and C_Sign, found through
C_GetFunctionList, with the GIL released from the first signature to the last.

The session and key handles are python-pkcs11's: the same loaded module (dlopen of one path
returns one instance), the same login, the same OS locking.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
from numba import njit

CK_ULONG = ctypes.c_ulong
_ADDRESS = ctypes.c_size_t  # pointers travel as integers into the compiled loop
_SIGN_INIT = ctypes.CFUNCTYPE(CK_ULONG, CK_ULONG, _ADDRESS, CK_ULONG)
_SIGN = ctypes.CFUNCTYPE(CK_ULONG, CK_ULONG, _ADDRESS, CK_ULONG, _ADDRESS, _ADDRESS)

# Positions in CK_FUNCTION_LIST after its CK_VERSION (PKCS#11 2.40 §5.16, unchanged in 3.0).
_C_SIGN_INIT = 42
_C_SIGN = 43

# Room for any signature up to RSA-8192. A longer one (CKR_BUFFER_TOO_SMALL leaves the operation
# active on the session) stops the loop and is finished here with a buffer of the size asked for.
SIGNATURE_ROOM = 1024

CKR_OK = 0
CKR_BUFFER_TOO_SMALL = 0x150

# Codes after which the session or the token is gone (the ones `hsm` treats as a dead token):
# the batch stops there, since on a network HSM every further call could wait out a timeout and
# would fail the same way; the jobs not attempted get the same code. Any other failure is that
# job's own, and the next job goes on.
SESSION_FAILURES = (
    0x05, 0x06,  # GENERAL_ERROR, FUNCTION_FAILED
    0x30, 0x31, 0x32,  # DEVICE_ERROR, DEVICE_MEMORY, DEVICE_REMOVED
    0x60, 0x82,  # KEY_HANDLE_INVALID, OBJECT_HANDLE_INVALID (handles of an older login)
    0x90,  # OPERATION_ACTIVE
    0xB0, 0xB3,  # SESSION_CLOSED, SESSION_HANDLE_INVALID
    0xE0, 0xE1,  # TOKEN_NOT_PRESENT, TOKEN_NOT_RECOGNIZED
    0x101,  # USER_NOT_LOGGED_IN
    0x190,  # CRYPTOKI_NOT_INITIALIZED
)


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("parameter", ctypes.c_void_p), ("parameter_len", CK_ULONG)]


@njit(nogil=True, cache=True)
def _sign_from(sign_init, sign, session, start, keys, jobs, data, out, out_len, rvs):  # pragma: no cover - compiled
    """Sign jobs start.. in turn: keys[i] the key handle, jobs[i] = (CK_MECHANISM address, offset
    of the message in `data`, its length). Signature i goes to out[i], its length to out_len[i],
    its CK_RV to rvs[i]. Returns the number of jobs done: all of them, or up to and including the
    first that ended in one of SESSION_FAILURES or in CKR_BUFFER_TOO_SMALL."""
    step = out_len.itemsize
    for i in range(start, keys.size):
        rv = sign_init(session, jobs[i, 0], keys[i])
        if rv == 0:
            out_len[i] = out.shape[1]
            rv = sign(session, data.ctypes.data + jobs[i, 1], jobs[i, 2],
                      out.ctypes.data + i * out.shape[1], out_len.ctypes.data + i * step)
        rvs[i] = rv
        if rv == CKR_BUFFER_TOO_SMALL:
            return i + 1
        for code in SESSION_FAILURES:
            if rv == code:
                return i + 1
    return keys.size


class BatchSigner:
    """Signs (key handle, mechanism, message) triples on one session of one PKCS#11 module."""

    def __init__(self, module_path: str) -> None:
        dll = ctypes.CDLL(module_path)
        get_function_list = dll.C_GetFunctionList
        get_function_list.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        get_function_list.restype = CK_ULONG
        table = ctypes.c_void_p()
        rv = get_function_list(ctypes.byref(table))
        if rv != CKR_OK or not table.value:
            raise OSError(f"C_GetFunctionList of {module_path} failed: 0x{rv:x}")
        # The CK_VERSION (two bytes) is padded to one pointer, then the functions follow in order.
        functions = ctypes.cast(table.value + ctypes.sizeof(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p))
        self.sign_init_address = functions[_C_SIGN_INIT]
        self.sign_address = functions[_C_SIGN]
        self._dll = dll  # keeps the module loaded as long as the function pointers are used
        self._sign_init = _SIGN_INIT(self.sign_init_address)
        self._sign = _SIGN(self.sign_address)
        # One CK_MECHANISM per type: right only for mechanisms without parameters (all we use);
        # RSA-PSS or any other with parameters would need its own structure per parameter set.
        self._mechanisms: dict[int, tuple[_Mechanism, int]] = {}  # type -> (struct, its address)

    def _mechanism_address(self, mechanism: int) -> int:
        entry = self._mechanisms.get(mechanism)
        if entry is None:
            struct = _Mechanism(mechanism, None, 0)
            entry = self._mechanisms.setdefault(mechanism, (struct, ctypes.addressof(struct)))
        return entry[1]

    def warm_up(self) -> None:
        """Load (or compile) the loop now rather than on the first signature."""
        empty = np.zeros(0, dtype=np.uint64)
        data = np.frombuffer(b"\0", dtype=np.uint8)  # read-only, as in `sign`
        _sign_from(self._sign_init, self._sign, 0, 0, empty, np.zeros((0, 3), dtype=np.int64), data,
                   np.empty((0, SIGNATURE_ROOM), dtype=np.uint8), np.zeros(0, dtype=np.dtype(CK_ULONG)), empty)

    def sign(self, session: int, items: Sequence[tuple[int, int, bytes]]) -> list[bytes | int]:
        """Sign each (key handle, mechanism, message) in turn: the signature, or the CK_RV.

        After one of SESSION_FAILURES, the jobs not attempted get the same CK_RV.
        """
        n = len(items)
        address = self._mechanism_address
        keys = np.array([key for key, _m, _d in items], dtype=np.uint64)
        lengths = np.array([len(message) for _k, _m, message in items], dtype=np.int64)
        jobs = np.empty((n, 3), dtype=np.int64)  # user-space addresses and offsets fit
        jobs[:, 0] = [address(mechanism) for _k, mechanism, _d in items]
        jobs[:, 1] = np.cumsum(lengths) - lengths
        jobs[:, 2] = lengths
        data = np.frombuffer(b"".join([message for _k, _m, message in items]) or b"\0", dtype=np.uint8)
        out = np.empty((n, SIGNATURE_ROOM), dtype=np.uint8)
        out_len = np.zeros(n, dtype=np.dtype(CK_ULONG))
        rvs = np.zeros(n, dtype=np.uint64)
        results: dict[int, bytes] = {}
        done = 0
        while done < n:
            done = _sign_from(self._sign_init, self._sign, session, done, keys, jobs, data, out, out_len, rvs)
            last = done - 1
            if rvs[last] == CKR_BUFFER_TOO_SMALL:
                results[last] = self._finish_long(session, data, jobs[last], int(out_len[last]), rvs, last)
            if rvs[last] in SESSION_FAILURES:
                rvs[done:] = rvs[last]  # stopped: the rest is not attempted
                break
        return [results.get(i) or (out[i, : out_len[i]].tobytes() if rvs[i] == CKR_OK else int(rvs[i]))
                for i in range(n)]

    def _finish_long(self, session: int, data: np.ndarray, job: np.ndarray, needed: int,
                     rvs: np.ndarray, i: int) -> bytes:
        """C_Sign again, with the room the module asked for: this also ends the operation."""
        buffer = ctypes.create_string_buffer(max(needed, 1))
        length = CK_ULONG(len(buffer))
        rv = self._sign(session, data.ctypes.data + int(job[1]), int(job[2]), ctypes.addressof(buffer),
                        ctypes.addressof(length))
        rvs[i] = rv
        return buffer.raw[: length.value] if rv == CKR_OK else b""
