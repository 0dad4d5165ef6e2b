"""The HTTP service (aiohttp): `create_app(settings)` in `gateway.http.app`, routes in `routes`."""
