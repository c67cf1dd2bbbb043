from common.rpc.server import run
from services.gateway.server import main

run(main)
