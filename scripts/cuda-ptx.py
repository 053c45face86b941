#!/usr/bin/env python3
"""Compiles the CUDA kernels (kernels/cuda/*.cu) to the PTX committed beside them, or checks it.

The PTX is generated with a pinned NVRTC (NVIDIA's PyPI wheel, below) so that the same source
always gives the same PTX, and the binaries load it through the driver: running on a GPU needs
only the NVIDIA driver, building needs nothing of CUDA.

  scripts/cuda-ptx.py            regenerate kernels/cuda/*.ptx
  scripts/cuda-ptx.py --check    fail if a committed .ptx differs from what its source compiles to,
                                 then assemble every PTX for each --arch with ptxas and print
                                 registers and spills per kernel (fail on any error or spill)

The wheels are downloaded once into target/cuda-tools (pip, from PyPI).
"""
import argparse
import ctypes
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ROOT / "kernels" / "cuda"
TOOLS = ROOT / "target" / "cuda-tools"
# CUDA 12.0's NVRTC writes PTX ISA 8.0, which every driver from R525 (CUDA 12.0) on loads: the
# oldest drivers that run an H100/H200 with CUDA 12, and the R535 (CUDA 12.2) drivers many cloud
# images still ship (a newer NVRTC's ISA, e.g. 12.4's 8.4, would not load there).
# kernels::cuda::MIN_DRIVER_VERSION states the same requirement at run time.
WHEELS = ["nvidia-cuda-nvrtc-cu12==12.0.76", "nvidia-cuda-nvcc-cu12==12.0.76"]
# The virtual architecture the PTX targets: Ampere (A100) and later JIT it.
PTX_ARCH = "compute_80"
OPTIONS = [f"--gpu-architecture={PTX_ARCH}", "--std=c++17", "-default-device"]


def tools():
    marker = TOOLS / "installed"
    pinned = "\n".join(WHEELS) + "\n"
    if not marker.exists() or marker.read_text() != pinned:
        shutil.rmtree(TOOLS, ignore_errors=True)
        TOOLS.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as wheels:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                 "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--python-version", "3.11", "-d", wheels, *WHEELS],
                check=True,
            )
            for wheel in pathlib.Path(wheels).glob("*.whl"):
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(TOOLS)
        (TOOLS / "nvidia" / "cuda_nvcc" / "bin" / "ptxas").chmod(0o755)
        marker.write_text(pinned)
    return TOOLS / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12", TOOLS / "nvidia" / "cuda_nvcc" / "bin" / "ptxas"


def compile_ptx(nvrtc, source):
    lib = ctypes.CDLL(str(nvrtc))
    prog = ctypes.c_void_p()

    def check(status, what):
        if status != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")

    src = source.read_bytes()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src, source.name.encode(), 0, None, None), "nvrtcCreateProgram")
    opts = (ctypes.c_char_p * len(OPTIONS))(*[o.encode() for o in OPTIONS])
    status = lib.nvrtcCompileProgram(prog, len(OPTIONS), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode(), file=sys.stderr)
    check(status, f"compiling {source.relative_to(ROOT)}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


def assemble(ptxas, ptx_file, arch):
    out = subprocess.run([str(ptxas), f"--gpu-name={arch}", "-v", "-o", "/dev/null", str(ptx_file)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas {arch} {ptx_file.name}:\n{out.stderr}")
    spills = False
    kernel, spill = None, None
    # ptxas -v prints, per kernel: "Compiling entry function", the spill line, then "Used N registers".
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = (int(m.group(1)), int(m.group(2)))
            spills |= spill != (0, 0)
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            print(f"  {arch} {kernel}: {m.group(1)} registers, spills {spill[0]}/{spill[1]} bytes (stores/loads)")
            kernel = None
    return spills


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="check the committed PTX and assemble it")
    parser.add_argument("--arch", default="sm_80,sm_90", help="ptxas targets for --check (comma-separated)")
    args = parser.parse_args()
    nvrtc, ptxas = tools()
    failed = False
    for source in sorted(SOURCES.glob("*.cu")):
        ptx = compile_ptx(nvrtc, source)
        target = source.with_suffix(".ptx")
        if not args.check:
            target.write_text(ptx)
            print(f"wrote {target.relative_to(ROOT)} ({len(ptx)} bytes)")
            continue
        if not target.exists() or target.read_text() != ptx:
            print(f"error: {target.relative_to(ROOT)} is not what {source.name} compiles to: run scripts/cuda-ptx.py",
                  file=sys.stderr)
            failed = True
            continue
        print(f"{target.relative_to(ROOT)}: matches {source.name}")
        for arch in args.arch.split(","):
            if assemble(ptxas, target, arch):
                print(f"error: {target.name} spills registers on {arch}", file=sys.stderr)
                failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
