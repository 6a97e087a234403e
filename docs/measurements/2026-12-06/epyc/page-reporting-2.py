# The same 2 GiB written twice: the first write faults the pages in, the second finds them present.
import mmap, ctypes, time
N = 2 << 30
for run in range(3):
    m = mmap.mmap(-1, N)
    buf = (ctypes.c_char * N).from_buffer(m)
    a = ctypes.addressof(buf)
    t = time.perf_counter(); ctypes.memset(a, 1, N); t1 = time.perf_counter(); ctypes.memset(a, 2, N); t2 = time.perf_counter()
    del buf; m.close()
    print(f"run {run+1}: first write {t1-t:.3f} s ({(t1-t)*1e9/(N/4096):.0f} ns per 4 KiB page), second write {t2-t1:.3f} s ({(t2-t1)*1e9/(N/4096):.0f} ns per page)", flush=True)
