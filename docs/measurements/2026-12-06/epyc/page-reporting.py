# Fresh anonymous memory touched right after other memory was freed, and
# after an idle spell: does the host's free page reporting cost a fault?
import mmap, ctypes, time, sys
N = 2 << 30
def reported():
    return int(open('/sys/module/page_reporting/parameters/reported_kib').read())
def touch():
    m = mmap.mmap(-1, N)
    buf = (ctypes.c_char * N).from_buffer(m)
    t = time.perf_counter(); ctypes.memset(ctypes.addressof(buf), 1, N); dt = time.perf_counter() - t
    del buf; m.close()
    return dt
for label, idle in [("after idle", 15), ("back to back", 0), ("back to back", 0), ("after idle", 15), ("back to back", 0), ("after idle", 5), ("after idle", 2), ("back to back", 0)]:
    time.sleep(idle)
    r0 = reported(); dt = touch(); r1 = reported()
    print(f"{label:13s} (idle {idle:2d} s): 2 GiB touched in {dt*1000:7.1f} ms = {dt*1e9/(N/4096):6.0f} ns per 4 KiB page; reported to the host meanwhile {(r1-r0)/1024:7.0f} MiB", flush=True)
