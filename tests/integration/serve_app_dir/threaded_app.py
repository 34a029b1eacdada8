import threading
import time

threading.Thread(target=time.sleep, args=(3600,), daemon=True, name="import-thread").start()

from asgi_app import app  # noqa: E402,F401
