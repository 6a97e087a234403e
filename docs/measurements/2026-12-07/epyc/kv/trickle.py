import socket, time, sys, threading
port=int(sys.argv[1]); nargs=int(sys.argv[2]); chunk=int(sys.argv[3]); argsz=int(sys.argv[4]) if len(sys.argv)>4 else 1
SLEEP=float(sys.argv[6]) if len(sys.argv)>6 else 0
pid=int(open(sys.argv[5]).read()) if len(sys.argv)>5 else None
def cpu():
    f=open(f"/proc/{pid}/stat").read().split(")")[1].split(); return (int(f[11])+int(f[12]))/100
frame=b"*%d\r\n"%nargs + (b"$%d\r\n"%argsz + b"a"*argsz + b"\r\n")*nargs
s=socket.create_connection(("127.0.0.1",port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1)
s.sendall(b"*1\r\n$4\r\nPING\r\n"); print(s.recv(100))
c0=cpu(); t0=time.time()
lat=[]
def probe():
    p=socket.create_connection(("127.0.0.1",port))
    while not done:
        t=time.time(); p.sendall(b"PING\r\n"); p.recv(100); lat.append(time.time()-t); time.sleep(0.05)
done=False; th=threading.Thread(target=probe); th.start()
for i in range(0,len(frame),chunk):
    s.sendall(frame[i:i+chunk]); time.sleep(SLEEP)
done=True; th.join()
s.settimeout(60); r=s.recv(200)
print("frame bytes",len(frame),"send time %.1fs"%(time.time()-t0),"server cpu %.1fs"%(cpu()-c0), "reply",r[:80], "probe lat p50 %.4f p90 %.4f max %.3f"%(sorted(lat)[len(lat)//2], sorted(lat)[len(lat)*9//10], max(lat)), "n",len(lat))
