"""``python -m lstmkit.backends.native``: build (or load) the native backend's operators now
and print one line saying how long it took or why they are unavailable. Always exits 0: a
machine without a compiler still runs lstmkit on its Python backends."""

from lstmkit.backends.native import available

ok, what = available()
print(f"lstmkit native backend: {what}" if ok else f"lstmkit native backend unavailable: {what}")
