# blk.S: a 32-bit protected-mode guest (flat segments, no paging, loaded at 0x1000) that drives
# the virtio-mmio block device at 0xC0001000 the way a driver does, and reports each result as
# one dword on port 0x500 (port 0x501 marks the end). The host test checks the sequence.
# Rebuild (the test checks blk.bin matches when `as` is present):
#   as --32 -o blk.o blk.S && objcopy -O binary -j .text blk.o blk.bin
.intel_syntax noprefix
.code32
.text

.set MMIO,   0xC0001000
.set REPORT, 0x500
.set DONE,   0x501
.set DESC,   0x10000          # 8-entry queue: descriptor table
.set AVAIL,  0x10080          #                available ring
.set USED,   0x10100          #                used ring
.set HDR,    0x11000          # request header (16 bytes)
.set STATUS, 0x11010          # status byte
.set RDATA,  0x12000          # read buffer: 8 sectors
.set WDATA,  0x14000          # write buffer: 1 sector
.set RSECT,  8                # sectors read from sector 0
.set WSECT,  5                # sector written

.macro mmio_w off, val
    mov dword ptr [MMIO + \off], \val
.endm
.macro mmio_r off
    mov eax, dword ptr [MMIO + \off]
.endm
.macro report
    mov dx, REPORT
    out dx, eax
.endm
.macro desc idx, addr, len, flags, next
    mov dword ptr [DESC + \idx*16], \addr
    mov dword ptr [DESC + \idx*16 + 4], 0
    mov dword ptr [DESC + \idx*16 + 8], \len
    mov word ptr [DESC + \idx*16 + 12], \flags
    mov word ptr [DESC + \idx*16 + 14], \next
.endm
.macro header type, sector
    mov dword ptr [HDR], \type
    mov dword ptr [HDR + 4], 0
    mov dword ptr [HDR + 8], \sector
    mov dword ptr [HDR + 12], 0
    mov byte ptr [STATUS], 0xff
.endm
# Make chain `head` available in ring slot `slot`, kick, wait (bounded) for the used entry,
# then report used idx, status byte, used length and interrupt status, and ack the interrupt.
.macro submit slot, head
    mov word ptr [AVAIL + 4 + \slot*2], \head
    mov word ptr [AVAIL + 2], \slot+1
    mmio_w 0x50, 0
    mov ecx, 1000000
1:  movzx eax, word ptr [USED + 2]
    cmp eax, \slot+1
    je 2f
    dec ecx
    jnz 1b
2:  report
    movzx eax, byte ptr [STATUS]
    report
    mov eax, dword ptr [USED + 4 + \slot*8 + 4]
    report
    mmio_r 0x60
    report
    mmio_w 0x64, eax
.endm

start:
    mov esp, 0x8000
    # identity
    mmio_r 0x000
    report
    mmio_r 0x004
    report
    mmio_r 0x008
    report
    # handshake: reset, ACKNOWLEDGE, DRIVER
    mmio_w 0x070, 0
    mmio_w 0x070, 1
    mmio_w 0x070, 3
    # features: accept VERSION_1 (bit 32) only
    mmio_w 0x014, 1
    mmio_r 0x010
    report
    mmio_w 0x024, 1
    mmio_w 0x020, 1
    mmio_w 0x024, 0
    mmio_w 0x020, 0
    mmio_w 0x070, 0xb
    mmio_r 0x070
    report
    # queue 0: 8 entries
    mmio_w 0x030, 0
    mmio_r 0x034
    report
    mmio_w 0x038, 8
    mmio_w 0x080, DESC
    mmio_w 0x084, 0
    mmio_w 0x090, AVAIL
    mmio_w 0x094, 0
    mmio_w 0x0a0, USED
    mmio_w 0x0a4, 0
    mmio_w 0x044, 1
    mmio_w 0x070, 0xf
    mmio_r 0x070
    report
    # capacity (low dword of the config space)
    mmio_r 0x100
    report

    # --- read sectors 0..RSECT into RDATA
    header 0, 0
    desc 0, HDR, 16, 1, 1
    desc 1, RDATA, RSECT*512, 3, 2
    desc 2, STATUS, 1, 2, 0
    submit 0, 0
    # checksum: 32-bit sum of the dwords read, then the first four dwords
    xor eax, eax
    mov esi, RDATA
    mov ecx, RSECT*128
3:  add eax, dword ptr [esi]
    add esi, 4
    dec ecx
    jnz 3b
    report
    mov eax, dword ptr [RDATA]
    report
    mov eax, dword ptr [RDATA + 4]
    report
    mov eax, dword ptr [RDATA + 8]
    report
    mov eax, dword ptr [RDATA + 12]
    report

    # --- write one sector at WSECT: dword i = 0xC0DE0000 + i
    mov edi, WDATA
    mov eax, 0xC0DE0000
    mov ecx, 128
4:  mov dword ptr [edi], eax
    add edi, 4
    inc eax
    dec ecx
    jnz 4b
    header 1, WSECT
    desc 0, HDR, 16, 1, 1
    desc 1, WDATA, 512, 1, 2
    desc 2, STATUS, 1, 2, 0
    submit 1, 0

    # --- flush
    header 4, 0
    desc 0, HDR, 16, 1, 2
    submit 2, 0

    # --- write past the end of the disk: must come back as IOERR (1)
    header 1, 0x7fffffff
    desc 0, HDR, 16, 1, 1
    submit 3, 0

    mov eax, 0x600DF00D
    mov dx, DONE
    out dx, eax
    hlt
    jmp start
