// Empty: the emulator defines these types in emu.h.
