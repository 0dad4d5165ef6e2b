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

# Room for any signature up to RSA-8192, so CKR_BUFFER_TOO_SMALL (which would leave the
# operation active on the session) cannot happen for the keys a token holds.
SIGNATURE_ROOM = 1024

CKR_OK = 0


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("parameter", ctypes.c_void_p), ("parameter_len", CK_ULONG)]


@njit(nogil=True, cache=True)
def _sign_all(sign_init, sign, session, jobs, data, out, out_len, rvs):  # pragma: no cover - compiled
    """jobs[i] = (key handle, CK_MECHANISM address, message length); the messages follow each
    other in `data`. Signature i goes to out[i], its length to out_len[i], its CK_RV to rvs[i]."""
    step = out_len.itemsize
    offset = 0
    for i in range(jobs.shape[0]):
        rv = sign_init(session, jobs[i, 1], jobs[i, 0])
        if rv == 0:
            out_len[i] = out.shape[1]
            rv = sign(session, data.ctypes.data + offset, jobs[i, 2],
                      out.ctypes.data + i * out.shape[1], out_len.ctypes.data + i * step)
        rvs[i] = rv
        offset += jobs[i, 2]


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
        self._mechanisms: dict[int, tuple[_Mechanism, int]] = {}  # type -> (struct, its address)

    def _mechanism_address(self, mechanism: int) -> int:
        entry = self._mechanisms.get(mechanism)
        if entry is None:
            struct = _Mechanism(mechanism, None, 0)
            entry = self._mechanisms.setdefault(mechanism, (struct, ctypes.addressof(struct)))
        return entry[1]

    def warm_up(self) -> None:
        """Load (or compile) the loop now rather than on the first signature."""
        self.sign(0, [])

    def sign(self, session: int, items: Sequence[tuple[int, int, bytes]]) -> list[bytes | int]:
        """Sign each (key handle, mechanism, message) in turn: the signature, or the CK_RV."""
        n = len(items)
        address = self._mechanism_address
        jobs = np.array([(key, address(mechanism), len(message)) for key, mechanism, message in items],
                        dtype=np.int64).reshape(n, 3)  # handles and user-space addresses fit
        data = np.frombuffer(b"".join([message for _k, _m, message in items]) or b"\0", dtype=np.uint8)
        out = np.empty((n, SIGNATURE_ROOM), dtype=np.uint8)
        out_len = np.zeros(n, dtype=np.dtype(CK_ULONG))
        rvs = np.zeros(n, dtype=np.uint64)
        _sign_all(self._sign_init, self._sign, session, jobs, data, out, out_len, rvs)
        return [out[i, : out_len[i]].tobytes() if rvs[i] == CKR_OK else int(rvs[i]) for i in range(n)]
