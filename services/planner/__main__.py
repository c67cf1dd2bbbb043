from common.rpc.server import run
from services.planner.server import main

run(main)
