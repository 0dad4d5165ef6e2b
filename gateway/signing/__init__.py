"""The signing core: HSM keys over PKCS#11, signature formats, verification.

`hsm` owns the PKCS#11 module; `base.KeySigner` is the one interface every format signs through;
signing (`xmldsig`, `cms`) and validation (`verify`, `validation`, `report`) are separate modules.
"""
