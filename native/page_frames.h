// Page frames: how guest pages travel from one GuestMemory to another (live migration's data
// plane). The sender packs the pages a bitmap selects into frames (GuestMemory.packPages), the
// Node side moves the bytes over its socket, the receiver verifies and applies them
// (GuestMemory.applyFrames). Nothing here knows about sockets.
//
// Frame format, version 2 (all integers little-endian; this comment is its only description,
// src/ffi/page-frames.ts exports the constants below under the same names):
//
//   offset  size  field
//   0       4     magic      0x46475056 ("VPGF" in memory)
//   4       2     version    2
//   6       2     flags      0, kFrameFlagTearable, or kFrameFlagEnd alone (a reader rejects any
//                            bit it does not know)
//   8       8     seq        sequence number; consecutive frames of one packPages call count up
//   16      4     pageCount  entries in the page table, 1..kMaxFramePages
//   20      4     dataPages  entries without the zero flag: each has a page CRC and 4096 payload bytes
//   24      4     tableCrc   CRC-32C of bytes [0, 24), then the page table, then the page CRCs
//   28      4     headerCrc  CRC-32C of bytes [0, 28): the lengths are trusted before the rest arrives
//   32      8*pageCount   page table: u64 per page; bits 0..62 the page number (its index in the
//                         guest memory, offset / 4096), bit 63 set = a zero page, no payload
//   ...     4*dataPages   page CRCs: CRC-32C of each data page, in table order
//   ...     4096*dataPages payload: the data pages, in table order
//
// A receiver checks, in order: magic, version, headerCrc, flags, pageCount and dataPages; then
// tableCrc, every page number against the memory's size, and that the zero flags count dataPages;
// then each data page against its CRC. A frame without kFrameFlagTearable whose page fails its CRC
// fails whole: none of its pages is used.
//
// Tearable frames. A page's CRC is the sender's reading of it. A sender that hands the kernel the
// guest's own pages (sendFrames with zeroCopy: no copy on the sending side) while the guest runs
// cannot vouch that the bytes which arrive are the bytes it read: the guest may rewrite a page
// before the receiver copies it. It marks such frames kFrameFlagTearable. A data page of a
// tearable frame that fails its CRC is applied anyway and recorded as torn (GuestMemory.tornPages);
// every other page of the frame is applied as usual. A page the guest rewrote was dirtied after the
// harvest that selected it, so a later pass sends it again, and a copy of it that passes its CRC
// clears the mark. Memory with torn pages must not be used: a torn page that never arrives again
// was damaged in transit.
//
// Within one frame a page may repeat (the last copy wins); ordering between frames is the caller's
// (by seq).
//
// On a stream of frames (GuestMemory.sendFrames / receiveFrames: the frames written straight to a
// socket), an end frame closes the stream: flags = kFrameFlagEnd, pageCount 0, dataPages 0, its
// tableCrc over bytes [0, 24) only. applyFrames rejects it (its frames come in buffers, not
// streams).
#pragma once
#include <cstddef>
#include <cstdint>

namespace vcpud {

constexpr uint32_t kFrameMagic = 0x46475056;
constexpr uint16_t kFrameVersion = 2;
constexpr size_t kFrameHeaderBytes = 32;
constexpr uint32_t kMaxFramePages = 1024;
constexpr uint32_t kDefaultFramePages = 256;
constexpr uint64_t kFrameZeroPage = 1ull << 63;
constexpr uint16_t kFrameFlagEnd = 1;
constexpr uint16_t kFrameFlagTearable = 2;
// Per page of a frame: its table entry (u64: page number, kFrameZeroPage), its CRC (u32, data pages
// only) and its payload (data pages only).
constexpr size_t kFrameTableEntryBytes = 8;
constexpr size_t kFramePageCrcBytes = 4;
constexpr size_t kFramePageBytes = 4096;
// Bytes a frame's table and page CRCs take at most (what precedes its payload, the header aside).
constexpr size_t kMaxFrameTableBytes = (kFrameTableEntryBytes + kFramePageCrcBytes) * size_t{kMaxFramePages};
constexpr size_t kMaxFrameBytes = kFrameHeaderBytes + kMaxFrameTableBytes + kFramePageBytes * size_t{kMaxFramePages};

}  // namespace vcpud
