"""The HTTP API over a Runtime (Starlette, served by uvicorn): the optional extra actorflow[http]."""
