from common.rpc.server import run
from services.worker.server import main

run(main)
